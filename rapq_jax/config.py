"""Settings of a post-training quantization run (frozen, hashable, validated)."""
import dataclasses
import math

from rapq_jax import objective, pot

# What the baselines share: none of rapq's exponent choices (nearest exponents, a fixed
# loss exponent), no search, the network as folded.
_BASELINE = dict(exp_init="nearest", act_exp_init="nearest", loss_p_source="fixed",
                 learn_exponent=False, align_scales="none", search="none")
# Method -> the PTQConfig fields it sets (``for_method``); the rest keep their defaults.
PRESETS = {
    "naive": dict(_BASELINE, reconstruct=False),
    "brecq": dict(_BASELINE, pot_scales=False),
    "brecq_pot": dict(_BASELINE),
    "rapq": dict(),
}
METHODS = tuple(PRESETS)
# Old field name -> its name now: records written before a rename (result files, stores)
# are read through ``current_names``.
# "lp" named three things (the scale search's p, the loss exponent's fields, exp_init='lp'):
# the loss exponent's fields are loss_p_*, the scale search's p is scale_p.
RENAMED = {"iters_w": "weight_iters", "iters_a": "act_iters", "lp_source": "loss_p_source",
           "lp_coef": "loss_p_coef", "lp_digits": "loss_p_digits", "lp_fixed": "loss_p_fixed",
           "init_p": "scale_p"}
# Field added after records were written -> the value that reproduces what those records
# did: ``current_names`` fills it in where a record lacks it.
# Fields that a record's other fields make irrelevant get any valid value (lr_bias without
# learn_bias, weight_exp_at without weight_exp_window). Before search_reach and
# search_holdout the search took single +-1 steps on the first search_samples images,
# which reconstruction also used (it then scored them in fake-quant arithmetic: such a
# record's search is not reproduced bit for bit, its units are).
ADDED = {"align_scales": "none", "search_folds": 1, "lr_w_ref_iters": 0, "search_rounds": 1,
         "pot_parts": "both", "act_exp_init": "nearest", "learn_bias": False,
         "act_presearch": False, "lr_bias": 1e-3, "protocol": "strict", "act_exp_window": 0,
         "weight_exp_window": 0, "weight_exp_at": 0.25, "exp_b_hold": False,
         "search_reach": 1, "search_holdout": False, "search_confidence": 0.0}
SEARCH_MODES = ("none", "before", "after", "both")
PROTOCOLS = ("strict", "official")
ALIGN_MODES = ("none", "weights", "acts", "stream", "acts_stream", "weights_stream",
               "equalize", "equalize_stream")
FLOAT_ALIGN_MODES = ("none", "equalize")   # the ones that are not about powers of two
POT_PARTS = ("both", "weights", "acts", "outputs", "inner")
EXP_INITS = ("nearest", "lp", "grid")
ACT_EXP_INITS = ("nearest", "lp")
# Float field -> (least value, whether the least value itself is allowed, greatest
# value or None); every float field must also be finite.
FLOAT_RANGES = {
    "lr_w": (0.0, False, None), "lr_exp": (0.0, False, None), "lr_a": (0.0, False, None),
    "round_weight": (0.0, True, None),
    "b_start": (0.0, False, None), "b_end": (0.0, False, None),   # AdaRound temperatures
    "warmup": (0.0, True, 1.0),
    "exp_reg_factor": (0.0, True, None),
    "loss_p_coef": (0.0, True, None),            # p = 1 + loss_p_coef * sigmoid(.) stays >= 1
    "loss_p_fixed": (0.0, False, None), "scale_p": (0.0, False, None),   # Lp exponents p > 0
    "bn_stats_weight": (0.0, True, None),
    "weight_phase_act_quant": (0.0, True, 1.0),
    "weight_exp_at": (0.0, True, 1.0),
    "lr_bias": (0.0, False, None),
    "search_confidence": (0.0, True, None),
}
BOOL_FIELDS = ("weight_signed", "pot_scales", "reconstruct", "learn_exponent",
               "reinit_alpha_on_harden", "exp_b_hold", "search_holdout", "learn_bias",
               "act_presearch")


def _check_float(name: str, value, lo: float, lo_ok: bool, hi: float | None) -> None:
  """ValueError naming ``name`` unless ``value`` is a finite number in its range."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} = {value!r}: expected a number")
  bound = (f">= {lo:g}" if lo_ok else f"> {lo:g}") + ("" if hi is None else f" and <= {hi:g}")
  if not math.isfinite(value) or value < lo or (value == lo and not lo_ok) or (
      hi is not None and value > hi):
    raise ValueError(f"{name} = {value!r}: expected a finite number {bound}")


@dataclasses.dataclass(frozen=True)
class PTQConfig:
  """What to quantize and how. Iteration counts are per reconstruction unit.

  Method switches (``method`` presets them through ``for_method``):
    pot_scales: every scale an exact power of two (False only for float BRECQ).
    pot_parts: with ``pot_scales``, which quantizers get power-of-two scales: ``'both'``
      (a power-of-two model), or only the ``'weights'``, only the ``'acts'``, only each
      unit's output activation (``'outputs'``: the values passed between units, on a
      ResNet its residual stream) or only the other activation points (``'inner'``: the
      network input and the activations inside units); the others keep float scales, as
      float BRECQ. A diagnostic that splits the cost of the power-of-two constraint
      between the parts of the network, for brecq_pot or (with its stream alignment and
      floor/ceil exponents) rapq. Its model is not power-of-two and has no integer form.
    reconstruct: AdaRound/BRECQ block reconstruction (False: round to nearest).
    learn_exponent: RAPQ's floor/ceil relaxation of each weight exponent, learned in the
      reconstruction's warm phase.
    exp_init: fixed exponents (no learning) start at the Lp scale's ``nearest`` power of
      two, at whichever of floor/ceil quantizes the weights with less Lp error (``lp``),
      or at the exponent and zero point with the least Lp error (``grid``:
      ``fake_quant.best_grid``).
  act_exp_init: where a power-of-two activation exponent starts: the ``nearest`` integer
    to the log2 of its Lp scale, or (``lp``) whichever of that scale's floor and ceil
    quantizes the unit's calibration activations with less Lp error (``exp_init='lp'``
    for activations; the default, and rapq's: over ``nearest`` it gained top-1 in 7 of
    8 CIFAR ResNet cases measured, mean +1.08 points, README). naive and brecq_pot keep
    ``nearest``.
  weight_phase_act_quant: during the weight phase, the probability that an activation
    inside the unit is quantized (0: FP activations as in BRECQ's first stage, 1: all
    quantized, in between: QDrop's random mix), drawn per element and step.
  loss_p_source, loss_p_coef, loss_p_digits: the unit's Lp exponent. ``'bn'``: RAPQ's
    ``p = round(1 + loss_p_coef * sigmoid((sum(gamma) - 1) / C), loss_p_digits)`` from the unit's
    last BN scale (``objective.bn_lp_exponent``), as in the official code. With its
    ``loss_p_coef = 0.1, loss_p_digits = 1`` (the defaults) p is 1.1 for every unit whose BN
    gammas sum above 1 and 1.0 below: one value for nearly every unit of a real network,
    so the BN information barely reaches the objective. Reports record the unrounded
    value beside p (``p_unrounded``). ``'fixed'``: ``loss_p_fixed`` for every unit. Units
    without BN (the classifier) always get ``loss_p_fixed``.
  protocol: which units are reconstructed, in which order and on what inputs (first and
    last layers at ``first_last_bits``, 8 by default, in both):

    =========================  ============================  =============================
    what                       ``'strict'`` (the default)    ``'official'`` (the RAPQ and
                                                             BRECQ ``main_imagenet.py``)
    =========================  ============================  =============================
    network input              quantized at 8 bits           float during calibration; the
                                                             returned model quantizes it
                                                             at 8 bits (see below)
    stem (first unit)          reconstructed; output         not reconstructed: round-to-
                               activation at ``abits``       nearest 8-bit weights; output
                                                             activation at 8 bits, at its
                                                             initial exponent
    p of stem / classifier     BN-derived /                  ``loss_p_fixed`` (2) /
                               ``loss_p_fixed``              ``loss_p_fixed``
    order                      unit by unit: its weights,    every unit's weights in order,
                               then its activations          then every unit's activations
    inputs of a unit's         the network quantized so far  the network with quantized
    weight phase               (weights and activations)     weights, float activations
    activation quantizers      the unit's initial (soft,     the unit's reconstructed
    initialised with           ~float) weights               weights
    =========================  ============================  =============================

    Both use a unit's p in its weight and activation phases (as RAPQ's fork does; BRECQ's
    own driver uses p = 2.4 for activations), initialise a unit's activation quantizers on
    its inputs from the network quantized so far (the official code: all of them in one
    forward before the activation phase) and keep the classifier's input at 8 bits (the
    official ``set_first_last_layer_to_8bit`` means to, but on ResNets the layer it
    changes has its output quantizer disabled, so there the last block's output stays at
    ``abits``). An integer model needs integer inputs, so under 'official' the returned
    model, and every figure measured with it (``PTQResult.apply``), quantizes the input
    at ``first_last_bits`` with the exponent ``fake_quant.init_act`` chooses on the
    calibration images, although calibration saw float inputs; ``report['protocol']``
    says so.
  """
  wbits: int = 4
  abits: int = 4
  first_last_bits: int = 8
  weight_signed: bool = False
  pot_scales: bool = True
  pot_parts: str = "both"
  reconstruct: bool = True
  learn_exponent: bool = False
  exp_init: str = "lp"
  act_exp_init: str = "lp"
  weight_iters: int = 2000
  act_iters: int = 500
  batch_size: int = 32
  lr_w: float = 1e-3
  # The weight_iters lr_w is set for: AdaRound's and BRECQ's 1e-3 over 20000 steps. A
  # shorter weight stage learns the rounding logits at lr_w * lr_w_ref_iters / weight_iters,
  # so that they can travel as far (Adam's steps are about lr long); at or above it, and
  # with 0, lr_w applies as given. rapq at 2000/500 (0 -> 20000): ResNet-20 W2A4 77.19 ->
  # 79.00 %; Fashion-MNIST ResNet (500/100) W2A4 80.89 -> 87.24 %, W4A4 88.75 -> 89.66 %.
  lr_w_ref_iters: int = 20000
  lr_exp: float = 1e-3
  lr_a: float = 4e-4
  # The activation phase also learns a correction of every layer's bias in the unit
  # (float32 [O] per layer, ``bias_shift`` in its weight state; the deployed model holds
  # bias plus correction as an int32 on its accumulator grid), at lr_bias with lr_a's
  # cosine decay. With power-of-two activation exponents the phase has otherwise little
  # to learn (``round(t)`` rarely moves): the bias absorbs the mean error that the
  # quantized activations leave in the unit's output.
  learn_bias: bool = False
  lr_bias: float = 1e-3
  round_weight: float = 0.01
  b_start: float = 20.0
  b_end: float = 2.0
  warmup: float = 0.2
  exp_warm_iters: int = 500
  exp_reg_factor: float = 10.0
  reinit_alpha_on_harden: bool = True
  # The temperature of v's regulariser in the exponent phase: annealed b_start -> b_end
  # over it (False) or held at b_start (True, the official code's schedule).
  exp_b_hold: bool = False
  loss_p_source: str = "bn"
  loss_p_coef: float = 0.1
  loss_p_digits: int | None = 1
  loss_p_fixed: float = 2.0
  bn_stats_weight: float = 0.0
  scale_p: float = 2.4
  weight_phase_act_quant: float = 0.0
  # Before quantization, rescale the channels between layers that only a ReLU separates
  # (rapq_jax.align, FP function unchanged) so that float-optimal scales are powers of
  # two: 'weights' puts each producer channel's Lp weight scale on 2**k, 'acts' each
  # inner ReLU point's Lp activation scale, 'stream' scales the values passed between
  # units (a residual stream) by one factor that brings its points' Lp scales closest to
  # powers of two, 'acts_stream' both (every activation point of a ResNet: the stream
  # first, then each inner ReLU), 'weights_stream' the stream, then 'weights';
  # 'equalize' gives each channel of the stream its own factor (tied wherever residual
  # sums add channels), balancing activation ranges against the weights reading them
  # (also for float methods), 'equalize_stream' that, then 'stream'; 'none'
  # leaves the network as folded. 'stream' is the
  # default (rapq's; naive, brecq and brecq_pot set 'none'): on CIFAR-10 at 2000/500,
  # seeds 1005-1007, rapq's mean top-1 moved +0.49 / +0.26 points on ResNet-56 and +0.12 /
  # -0.41 on ResNet-20 (W4A4 / W2A4), its test KL to FP fell or stayed (README). On
  # ResNet-20 W2A4 'weights' and 'acts' lost to 'none' (76.09 / 75.61 % against 77.19 %);
  # on ResNet-56 (seed 1005) 'acts_stream' lost 0.82 points at W4A4 and gained 0.75 at
  # W2A4 (older defaults); at today's it moved top-1 by -0.47 to +0.80 in 10 runs (ResNet-20
  # seeds 1005-1006, ResNet-56 1005-1007), within seed noise (README). 'weights_stream'
  # on ResNet-20 (seed 1005): +0.21 / -1.00 points against 'stream' (W4A4 / W2A4), its
  # test KL higher at both (README).
  align_scales: str = "stream"
  # Part-way through the weight stage (after weight_exp_at of its rounding steps), move
  # each PoT weight channel's exponent to whichever of e + k, |k| <= weight_exp_window,
  # gives its layer output the least Lp error on the unit's calibration cache (0: off).
  weight_exp_window: int = 0
  weight_exp_at: float = 0.25
  # After the activation phase, re-choose each PoT activation exponent among round(t) + k,
  # |k| <= act_exp_window, by the unit's loss over its calibration cache (0: off).
  act_exp_window: int = 0
  # The network-wide search over integer exponents: 'after' reconstruction (over the
  # low-bit activation exponents), 'before' it (over weight and activation exponents of
  # round-to-nearest weights), 'both' or 'none'. 'none' is rapq's default since issue 13's
  # three-seed comparison (README): on CIFAR-10 ResNet-20 and ResNet-56 (seeds 1005-1007,
  # W4A4 and W2A4) rapq without the search (reconstructing on all calibration images)
  # agreed more with FP in all 12 runs and gained mean top-1 in all 4 model/width pairs
  # (ResNet-20 +0.21 / +0.42, ResNet-56 +0.27 / +0.73), while the search halves the KL on
  # its held-out calibration images: it fits them. On the Fashion-MNIST default job the
  # search gained 0.57 at W2A4 and lost 0.52 at W4A4.
  # The search after reconstruction is the ablation rapq_search. Earlier figures, at
  # older defaults: over the low-bit quantizers only (first/last-layer ones keep their
  # exponents): ResNet-20 W2A4 77.41 vs 77.16 without a search and 76.40 when it also
  # moved the 8-bit classifier input; Fashion-MNIST ResNet W2A4 78.74 vs 72.87.
  # The search scores candidates on the deployed integer model's logits
  # (quantized.apply) and walks each exponent up to search_reach steps per visit while
  # each step lowers the objective. Fashion-MNIST ResNet W2A4, 500/100, 384 + 128
  # held-out images: reach 1 stopped at its 3 sweeps (78.9); reach 8 converged within
  # them to the same exponents as reach 1 given 10 sweeps (79.5); W4A4 equal (90.0).
  search: str = "none"
  # Before reconstruction, move each low-bit activation exponent from where its
  # initialisation puts it by the network-wide search (search_objective, _sweeps, _reach,
  # _folds) on the network with first_last_bits weights (near float) and its low-bit
  # activations, scored on the first search_samples reconstruction images; each unit's
  # activation exponents then start on its quantized inputs plus these offsets. It
  # chooses the activation grid for the error that accumulates along a residual stream,
  # which each point's own Lp error does not see. On ResNet-56 (seed 1005) it lost
  # 1.18 / 0.91 points against rapq at W4A4 / W2A4, and 0.63 / 0.63 on the stream-
  # aligned network: a grid that suits the near-float network does not suit the one
  # whose rounding is learned under it.
  act_presearch: bool = False
  search_objective: str = "kl"
  search_sweeps: int = 3
  search_reach: int = 8
  # A move is taken only if it lowers the objective on each of search_folds equal, disjoint
  # parts of the search images (1: on all of them together). On ResNet-56 W4A4 the search
  # at 1 fold halved the KL on its 256 images (0.308 -> 0.149) while the result's test KL
  # was 0.310: it fitted those images. At 2 folds it moved 3 exponents and scored as no
  # search did (80.45 vs 80.41 %, KL 0.348 vs 0.345).
  search_folds: int = 1
  # A move is also taken only if it lowers the mean objective by more than
  # search_confidence standard errors of its per-image change (a one-sided paired test;
  # 0: any decrease). The search scores hundreds of candidates on a few hundred images,
  # and some lower the objective there by chance.
  search_confidence: float = 0.0
  # Calibration images the search scores; with search_holdout (the default since issue
  # 13) they are the last search_samples images, held out from initialisation and
  # reconstruction, which fit the quantizers on the rest; False: the search scores the
  # first search_samples, which reconstruction also uses (before issue 13).
  search_samples: int = 256
  search_holdout: bool = True
  # Rounds of search and re-reconstruction after reconstruction: in each round after the
  # first, every unit whose weight-stage inputs the last search changed learns its
  # rounding again (restarted, on the network as it now is, activation exponents where
  # the search left them), then the search runs again; it stops early when a search
  # moves nothing. 1: one search, no re-reconstruction.
  search_rounds: int = 1
  protocol: str = "strict"
  seed: int = 1005

  def __post_init__(self):
    for name in BOOL_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} = {getattr(self, name)!r}: expected True or False")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise ValueError(f"seed = {self.seed!r}: expected an integer")
    for name, limits in FLOAT_RANGES.items():
      _check_float(name, getattr(self, name), *limits)
    digits = self.loss_p_digits
    if digits is not None and (isinstance(digits, bool) or not isinstance(digits, int)
                               or digits < 0):
      raise ValueError(f"loss_p_digits = {digits!r}: expected None or an integer >= 0")
    for name in ("wbits", "abits", "first_last_bits"):
      try:
        pot.check_bits(getattr(self, name))
      except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    for name in ("weight_iters", "act_iters", "search_sweeps", "exp_warm_iters",
                 "act_exp_window", "weight_exp_window", "lr_w_ref_iters"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"{name} = {getattr(self, name)!r}: expected an integer >= 0")
    for name in ("batch_size", "search_samples", "search_reach", "search_folds",
                 "search_rounds"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} = {getattr(self, name)!r}: expected an integer >= 1")
    if self.search_confidence and self.search_samples < 2:
      raise ValueError(f"search_confidence = {self.search_confidence} needs search_samples "
                       f">= 2 (a standard error), got {self.search_samples}")
    if self.search_samples % self.search_folds:
      raise ValueError(f"search_folds = {self.search_folds}: must divide search_samples = "
                       f"{self.search_samples}")
    if self.loss_p_source not in ("bn", "fixed"):
      raise ValueError(f"loss_p_source = {self.loss_p_source!r}: expected 'bn' or 'fixed'")
    if self.exp_init not in EXP_INITS:
      raise ValueError(f"exp_init = {self.exp_init!r}: expected one of {EXP_INITS}")
    if self.act_exp_init not in ACT_EXP_INITS:
      raise ValueError(f"act_exp_init = {self.act_exp_init!r}: expected one of {ACT_EXP_INITS}")
    if self.search not in SEARCH_MODES:
      raise ValueError(f"search = {self.search!r}: expected one of {SEARCH_MODES}")
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol = {self.protocol!r}: expected one of {PROTOCOLS}")
    if self.pot_parts not in POT_PARTS:
      raise ValueError(f"pot_parts = {self.pot_parts!r}: expected one of {POT_PARTS}")
    if self.pot_parts != "both" and not (self.pot_scales and self.search == "none"
                                         and not self.learn_exponent
                                         and not self.weight_exp_window
                                         and not self.act_exp_window):
      raise ValueError(f"pot_parts = {self.pot_parts!r} keeps float scales on one side: it "
                       "needs pot_scales=True, search='none', learn_exponent=False "
                       "and no exponent windows")
    if self.align_scales not in ALIGN_MODES:
      raise ValueError(f"align_scales = {self.align_scales!r}: expected one of {ALIGN_MODES}")
    if self.align_scales not in FLOAT_ALIGN_MODES and not self.pot_scales:
      raise ValueError(f"align_scales = {self.align_scales!r} puts scales on powers of two: "
                       "it needs pot_scales=True")
    if self.search_objective not in objective.SEARCH_OBJECTIVES:
      raise ValueError(f"search_objective = {self.search_objective!r}: expected one of "
                       f"{objective.SEARCH_OBJECTIVES}")
    if self.learn_exponent and self.exp_warm_iters > self.weight_iters and self.reconstruct:
      raise ValueError(f"exp_warm_iters = {self.exp_warm_iters} exceeds weight_iters = "
                       f"{self.weight_iters}: the exponent must be hardened before the end")
    if self.weight_exp_window and (self.learn_exponent or not self.pot_scales):
      raise ValueError(f"weight_exp_window = {self.weight_exp_window} moves fixed power-of-two "
                       "exponents: it needs pot_scales=True and learn_exponent=False")
    if self.search_rounds > 1 and not (self.reconstruct and self.search in ("after", "both")
                                       and self.protocol == "strict"):
      raise ValueError(f"search_rounds = {self.search_rounds} alternates the search after "
                       "reconstruction with re-reconstruction: it needs reconstruct=True, "
                       "search 'after' or 'both' and protocol 'strict'")
    if self.act_presearch and not (self.pot_scales and self.pot_parts == "both"
                                   and self.reconstruct and self.search in ("none", "after")):
      raise ValueError("act_presearch = True chooses power-of-two activation exponents for "
                       "reconstruction to start from: it needs pot_scales=True, "
                       "pot_parts='both', reconstruct=True and search 'none' or 'after'")
    if self.learn_bias and not self.reconstruct:
      raise ValueError("learn_bias = True learns in the activation phase of reconstruction: "
                       "it needs reconstruct=True")
    if not self.pot_scales and (self.learn_exponent or self.search != "none"):
      raise ValueError("float scales (pot_scales=False) need learn_exponent=False and "
                       "search='none'")

  @property
  def pot_model(self) -> bool:
    """Whether every scale of the result is a power of two (``pot_scales`` on both
    weights and activations)."""
    return self.pot_scales and self.pot_parts == "both"

  @property
  def runs_exponent_relaxation(self) -> bool:
    """Whether the weight exponents' floor/ceil relaxation runs: ``learn_exponent`` with
    power-of-two scales and reconstruction."""
    return self.pot_scales and self.reconstruct and self.learn_exponent


def current_names(fields: dict) -> dict:
  """``fields`` (PTQConfig fields by name, as a record of any version holds them) with
  every old name of ``RENAMED`` replaced by its name now and every field of ``ADDED``
  the record lacks set to the value that reproduces it."""
  return {**ADDED, **{RENAMED.get(k, k): v for k, v in fields.items()}}


def for_method(method: str, **overrides) -> PTQConfig:
  """Preset of a method; ``overrides`` replace fields, the preset's own included.

  'naive': Lp scale to the nearest PoT, round to nearest. 'brecq': BRECQ with float
  scales. 'brecq_pot': BRECQ on nearest-PoT scales. 'rapq': our RAPQ: per-channel
  floor/ceil weight exponent choice, per-tensor floor/ceil activation exponent choice
  (``act_exp_init``), on the network whose residual stream is rescaled so that its
  activation scales land near powers of two (``align_scales='stream'``, FP function
  unchanged), BN-derived Lp objective (the paper's learned floor/ceil
  relaxation is ``learn_exponent=True``; on the shared ResNet-20 it reconstructed worse
  than choosing floor/ceil by weight Lp error); the network-wide search over the integer
  exponents of the low-bit quantizers after reconstruction is ``search='after'`` (not
  the default: it fitted its calibration images, see ``PTQConfig.search``).
  Figures: docs/RESULTS.md.
  """
  if method not in PRESETS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  for old in overrides.keys() & RENAMED.keys():
    raise ValueError(f"{old} is now called {RENAMED[old]}")
  return PTQConfig(**{**PRESETS[method], **overrides})
