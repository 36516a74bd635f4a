"""rapq-jax: exact power-of-two post-training quantization for JAX/Flax.

``rapq_jax.quantize(model, variables, calibration_images)`` quantizes a user's own
``flax.linen`` model (see ``rapq_jax.adapter``); ``rapq_jax.ptq`` is the pipeline on
folded networks and ``rapq_jax.config`` its settings.
"""
from rapq_jax.adapter import UnsupportedModelError, quantize, read_model
from rapq_jax.config import PTQConfig, for_method

__all__ = ["PTQConfig", "UnsupportedModelError", "for_method", "quantize", "read_model"]
