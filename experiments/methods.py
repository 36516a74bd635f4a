"""Quantization methods and ablations as runnable experiments.

Each method maps an experiment config (ml_collections) to a ``rapq_jax`` ``PTQConfig``:
the method's preset, then the ``config.ptq`` fields the config or the command line sets
(unset ones are None), then the config's bit widths, iteration budget and seed; an
ablation's own switch cannot be overridden. ``run_method`` quantizes the config's model
with it and measures top-1, wall time and what the plots need.
"""
import dataclasses
import pathlib
import time

import ml_collections
import numpy as np

from experiments import pipeline
from experiments.configs import base as base_config
from rapq_jax import config as ptq_config_lib
from rapq_jax import evaluate as evaluate_lib
from rapq_jax import adapter, export, parallel, ptq, quantized, resume

# pot_parts value -> what keeps power-of-two scales (the rest float, as float BRECQ's)
_POT_PARTS = {
    "weights": "the weights only (activation scales float and learned)",
    "acts": "the activations only (weight scales float)",
    "outputs": "each unit's output only (a ResNet's residual stream)",
    "inner": "the activations inside units and the network input only",
}


def _pot_part(base: str, part: str) -> tuple[str, dict, str]:
  """The diagnostic that splits ``base``'s power-of-two cost: its share at ``part``."""
  return (base, {"pot_parts": part},
          f"{base} with power-of-two scales on {_POT_PARTS[part]}: that part's share of "
          "the power-of-two cost")


# name -> (base method, PTQConfig overrides, one-line description)
QUANT_METHODS = {
    "naive": ("naive", {}, "Lp scale to nearest power of two, round to nearest"),
    "brecq": ("brecq", {}, "BRECQ, float scales (non-PoT upper bound)"),
    "brecq_pot": ("brecq_pot", {}, "BRECQ on nearest power-of-two scales"),
    **{f"brecq_pot_{part}": _pot_part("brecq_pot", part) for part in _POT_PARTS},
    "rapq": ("rapq", {}, "RAPQ: per-channel PoT exponent choice, BN-derived Lp, residual "
                     "stream rescaled onto powers of two"),
    **{f"rapq_pot_{part}": _pot_part("rapq", part) for part in _POT_PARTS},
    "rapq_learned_exp": ("rapq", {"learn_exponent": True},
                         "RAPQ with the paper's learned floor/ceil exponent relaxation"),
    "rapq_learned_exp_official": (
        "rapq", {"learn_exponent": True, "exp_b_hold": True, "reinit_alpha_on_harden": False},
        "the learned relaxation on the official schedule: b held at b_start in the exponent "
        "phase, rounding not restarted (set its length with ptq.exp_warm_iters)"),
    "rapq_nearest_exp": ("rapq", {"exp_init": "nearest"},
                         "RAPQ with nearest (log-domain) exponents instead of the Lp choice"),
    "rapq_nearest_act_exp": ("rapq", {"act_exp_init": "nearest"},
                             "RAPQ with each activation exponent starting at the nearest "
                             "integer to the log2 of its Lp scale (rapq before the floor/ceil "
                             "choice by Lp error became its default)"),
    "rapq_grid": ("rapq", {"exp_init": "grid"},
                  "RAPQ with each weight channel's exponent (floor - 1 .. ceil) and zero point "
                  "chosen together by Lp error"),
    "rapq_no_bnp": ("rapq", {"loss_p_source": "fixed"}, "RAPQ with p = 2 instead of BN-derived p"),
    "rapq_bnstats": ("rapq", {"bn_stats_weight": 1.0}, "RAPQ plus the BN-statistics term"),
    "rapq_search": ("rapq", {"search": "after"},
                    "RAPQ plus the network-wide search over the low-bit activation exponents "
                    "after reconstruction (rapq's default before issue 13's three-seed "
                    "comparison)"),
    "rapq_search_folds": ("rapq", {"search": "after", "search_folds": 2},
                          "RAPQ, a search move must lower the KL on both halves of the search "
                          "images"),
    "rapq_search_confident": ("rapq", {"search": "after", "search_confidence": 2.0},
                              "RAPQ, a search move must lower the KL by more than 2 standard "
                              "errors of its per-image change"),
    "rapq_search_ce": ("rapq", {"search": "after", "search_objective": "ce"},
                       "RAPQ, the search lowers the cross-entropy to the FP model's top-1 "
                       "class instead of the KL to its outputs"),
    "rapq_search_rounds": ("rapq", {"search": "after", "search_rounds": 2},
                           "RAPQ, the search alternated with re-reconstruction of the units "
                           "whose inputs it changed (2 rounds, the better one kept)"),
    "rapq_qdrop": ("rapq", {"weight_phase_act_quant": 0.5},
                   "RAPQ whose weight stage sees each activation inside the unit quantized "
                   "with probability 0.5 (QDrop), so the rounding learns under the power-of-"
                   "two activation grid"),
    "rapq_act_choice": ("rapq", {"act_exp_window": 2},
                        "RAPQ, activation exponents re-chosen within +-2 by each unit's loss"),
    "rapq_weight_choice": ("rapq", {"weight_exp_window": 1},
                           "RAPQ, weight exponents re-chosen within +-1 per channel by layer-"
                           "output error a quarter into reconstruction"),
    "rapq_act_presearch": ("rapq", {"act_presearch": True},
                           "RAPQ whose activation exponents start where a network-wide search "
                           "on the network with 8-bit weights puts them (ptq.act_presearch)"),
    "rapq_bias": ("rapq", {"learn_bias": True},
                  "RAPQ whose activation phase also learns each layer's bias correction "
                  "(an int32 in the deployed model) against the unit's output"),
    "rapq_align_weights": ("rapq", {"align_scales": "weights"},
                           "RAPQ on a network rescaled (FP function unchanged) so that each "
                           "block's first conv has its float Lp weight scales on powers of two"),
    "rapq_align_acts": ("rapq", {"align_scales": "acts"},
                        "RAPQ on a network rescaled (FP function unchanged) so that each "
                        "block's inner ReLU has its float Lp activation scale on a power of two"),
    "rapq_no_align": ("rapq", {"align_scales": "none"},
                      "RAPQ on the network as folded, its residual stream not rescaled "
                      "(rapq's default before the stream alignment)"),
    "rapq_align_all": ("rapq", {"align_scales": "acts_stream"},
                       "RAPQ on a network rescaled (FP function unchanged) so that every "
                       "activation point's float Lp scale is near a power of two: the "
                       "residual stream by one factor, then each block's inner ReLU"),
    "rapq_align_weights_stream": ("rapq", {"align_scales": "weights_stream"},
                                  "RAPQ on a network rescaled (FP function unchanged): the "
                                  "residual stream by one factor, then each block's first "
                                  "conv channel by channel onto its float Lp weight scale"),
    "rapq_equalize": ("rapq", {"align_scales": "equalize_stream"},
                      "RAPQ on a network rescaled (FP function unchanged): the residual "
                      "stream's channels equalized against the weights reading them, one "
                      "factor per channel that residual sums tie together, then the stream "
                      "factor"),
    "brecq_equalize": ("brecq", {"align_scales": "equalize"},
                       "Float BRECQ on the same channel-equalized network as rapq_equalize"),
    "rapq_official": ("rapq", {"protocol": "official"},
                      "RAPQ under the official driver's protocol (PTQConfig.protocol)"),
    "brecq_official": ("brecq", {"protocol": "official"},
                       "Float BRECQ under the official driver's protocol (PTQConfig.protocol)"),
}


def ptq_config(config: ml_collections.ConfigDict, method: str) -> ptq_config_lib.PTQConfig:
  """The PTQConfig of ``method`` for an experiment config (ValueError names bad fields,
  or a reconstruction batch size that the devices cannot split evenly)."""
  if method not in QUANT_METHODS:
    raise ValueError(f"unknown method {method!r}; accepted: {', '.join(QUANT_METHODS)}")
  base, switch, _ = QUANT_METHODS[method]
  fields = {name: config[name] for name in base_config.TOP_LEVEL}
  accepted = {f.name for f in dataclasses.fields(ptq_config_lib.PTQConfig)} - set(fields)
  given = {k: v for k, v in config.ptq.to_dict().items() if v is not None}   # None: unset
  unknown = sorted(set(config.ptq) - accepted)
  if unknown:
    raise ValueError(f"unknown config.ptq field(s) {unknown}; accepted: {sorted(accepted)}")
  contradicted = {k: v for k, v in given.items() if k in switch and v != switch[k]}
  if contradicted:
    raise ValueError(f"method {method!r} is {base!r} with {switch}; config.ptq sets "
                     f"{contradicted}: run {base!r} with those fields instead")
  # Precedence: the base method's preset < every config.ptq field given (here or on the
  # command line) < the config's top-level fields < the ablation's own switch.
  try:
    cfg = ptq_config_lib.for_method(base, **{**given, **fields, **switch})
    if cfg.reconstruct:
      parallel.check_batch(cfg.batch_size)
    return cfg
  except (TypeError, ValueError) as err:
    raise ValueError(f"method {method!r}: {err}") from None


def _weight_exponents(result: ptq.PTQResult) -> dict:
  """``{'unit/role': {exponent: count}}`` of the final per-channel weight exponents."""
  if result.model is None:
    return {}
  out = {}
  for unit, layers in result.model.weights.items():
    for role, w in layers.items():
      values, counts = np.unique(np.asarray(w["e"]), return_counts=True)
      out[f"{unit}/{role}"] = {int(v): int(c) for v, c in zip(values, counts)}
  return out


def power_of_two(model: quantized.QuantizedModel | None) -> bool:
  """Whether every scale of a method's result is an exact power of two: a model exists
  (float-scale methods such as brecq have none) and ``quantized.check_power_of_two``
  accepts it (int32 exponents in range, integer weights in their range)."""
  if model is None:
    return False
  try:
    quantized.check_power_of_two(model)
  except AssertionError:
    return False
  return True


def run_name(method: str, wbits: int | None, abits: int | None) -> str:
  """``'fp'`` (no bit widths) or ``'<method>_w<W>a<A>'``: the name of one run of a run
  directory, of its result file, its saved model and its unit store."""
  return method if wbits is None else f"{method}_w{wbits}a{abits}"


def run_method(config: ml_collections.ConfigDict, data: pipeline.Data, method: str, *,
               progress: bool = True, save_dir: str | pathlib.Path | None = None,
               store_dir: str | pathlib.Path | None = None,
               reference_logits: np.ndarray | None = None) -> dict:
  """Quantizes and evaluates; returns a JSON-serialisable record of the run. With
  ``save_dir``, a power-of-two model is saved (orbax, atomically) to
  ``save_dir/<run_name>`` with its input shape and preprocessing. With
  ``store_dir``, finished units are kept in ``store_dir/<run_name>`` and loaded
  from there by a later call (``rapq_jax.resume.Store``). The agreement and KL figures
  compare with ``reference_logits``, the FP model's logits on the test split
  (``pipeline.fp_logits``, computed here when not given)."""
  cfg = ptq_config(config, method)
  start = time.perf_counter()
  model, variables = pipeline.load_model(config)
  calib = data.preprocess(data.calib_images)
  net = adapter.read_model(model, variables, calib, apply_kwargs={"train": False})
  name = run_name(method, cfg.wbits, cfg.abits)
  store = None if store_dir is None else resume.Store(pathlib.Path(store_dir) / name)
  result = ptq.quantize_network(net, calib, cfg, progress=progress, store=store,
                                metadata=dict(method=method, ptq=cfg.__dict__))
  quant_seconds = time.perf_counter() - start
  if save_dir is not None and result.model is not None:
    export.save_model(result.model, pathlib.Path(save_dir) / name,
                      extra=dict(input_shape=list(calib.shape[1:]),
                                 preprocess=dict(scale=1 / 255, mean=config.dataset.mean,
                                                 std=config.dataset.std)))
  if reference_logits is None:
    reference_logits = pipeline.fp_logits(config, data, progress=progress)
  metrics = evaluate_lib.evaluate(result.apply, data.test_images, data.test_labels,
                                  batch_size=config.eval_batch_size, preprocess=data.preprocess,
                                  desc=f"{method} W{cfg.wbits}A{cfg.abits}", progress=progress,
                                  reference_logits=reference_logits)
  units = result.report["units"]
  iters = cfg.weight_iters + cfg.act_iters
  return dict(
      **metrics,
      power_of_two=power_of_two(result.model),
      quantize_seconds=quant_seconds,
      wall_seconds=time.perf_counter() - start,
      seconds_per_iter={u: r["seconds"] / iters for u, r in units.items()} if iters else {},
      lp={u: r["p"] for u, r in units.items()},
      lp_unrounded={u: r["p_unrounded"] for u, r in units.items()},
      weight_moves={u: r.get("weight_moves", {}) for u, r in units.items()},
      loss_curves={u: r["history"] for u, r in units.items()},
      search=result.report["search"],
      protocol=result.report["protocol"],
      align=result.report["align"],
      weight_exponents=_weight_exponents(result),
      ptq=dict(cfg.__dict__),
  )
