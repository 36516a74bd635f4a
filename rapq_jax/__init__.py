"""rapq-jax: exact power-of-two post-training quantization for JAX/Flax.

``rapq_jax.quantize(model, variables, calibration_images)`` quantizes a user's own
``flax.linen`` model, ``rapq_jax.quantize(model, calibration_images)`` a ``flax.nnx`` one
(see ``rapq_jax.adapter``); ``rapq_jax.ptq`` is the pipeline on
folded networks and ``rapq_jax.config`` its settings. Names load on first use, so that
``rapq_jax.reference_reader`` runs with numpy alone.
"""
import importlib

_EXPORTS = {"quantize": "adapter", "read_model": "adapter", "UnsupportedModelError": "adapter",
            "PTQConfig": "config", "for_method": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"rapq_jax.{_EXPORTS[name]}"), name)
  try:
    return importlib.import_module(f"rapq_jax.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"rapq_jax.{name}":
      raise
    raise AttributeError(f"module 'rapq_jax' has no attribute {name!r}") from None
