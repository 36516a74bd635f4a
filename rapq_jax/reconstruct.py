"""Per-unit reconstruction: learn weight rounding (AdaRound), RAPQ's weight exponents and
then activation exponents, against an Lp reconstruction of the FP unit's output.

Each phase is a ``Phase``: a pure ``init`` and a jitted ``step`` over a NamedTuple state
(``WeightPhaseState``, ``ActPhaseState``), as an optax transformation, compiled once per
unit shape (``weight_phase``, ``act_phase``) and not per budget: the iteration counts
their schedules read are traced values in the states (``Budget``). The steps are driven
from Python (on CPU a conv weight gradient inside ``lax.fori_loop`` measured ~15x slower
than the same jitted step called from a loop). Calibration inputs and targets are cached once per unit on the devices,
split along rows over all of them (``parallel``), and each step draws its batch there,
so the loop has no host transfer except the periodic progress read-out. Each device
computes its share of the batch; the loss is a batch mean, so XLA averages the shares of
the gradient across devices.

Phases of a unit's weight stage (``weight_iters`` steps in all; the rounding logits
``alpha`` learn at ``lr_w``, times ``lr_w_ref_iters / weight_iters`` in a stage shorter
than ``lr_w_ref_iters`` steps, ``rounding.lr_scale``, so that they can move as far):
1. (RAPQ) ``exp_warm_iters`` steps learning ``alpha`` and the exponent logits ``v``
   jointly, with ``v``'s own regulariser (weight ``exp_reg_factor * round_weight``,
   ``b`` annealed from ``b_start`` to ``b_end`` over the phase, or held at ``b_start``
   with ``exp_b_hold`` as in the official code);
2. the exponent is hardened to an exact integer and frozen, ``alpha`` restarts on the
   new grid (``reinit_alpha_on_harden``) and anneals as AdaRound for the rest.
Fixed exponents (no ``v``) respond to reconstruction with ``weight_exp_window`` > 0:
after ``weight_exp_at`` of the rounding steps, each output channel of each PoT layer
takes whichever of ``e + k`` (``|k| <= weight_exp_window``) gives its layer output the
smallest Lp error over the unit's whole calibration cache, the other layers at their
learned rounding (``choose_weight_exponents``). The current grid keeps its learned
rounding and another grid is scored at round to nearest, so a channel moves only where
the other grid is better before any rounding is learned on it; it then restarts its
rounding there, and AdaRound goes on for the remaining steps. (Scoring every grid at
round to nearest moved channels to coarser grids, less clipping, that AdaRound then
used worse: ResNet-20 W2A4 71.75 vs 77.19, results/cifar10_resnet20_w2a4_weight_choice.json.)
Then ``act_iters`` steps learn the unit's activation exponents with hard weights. A
power-of-two exponent uses ``round(t)``, and Adam at ``lr_a`` rarely carries ``t`` across
a rounding boundary, so with ``act_exp_window`` > 0 each PoT activation exponent is then
chosen among ``round(t) + k`` (``|k| <= act_exp_window``) by the unit's loss over its
whole calibration cache (``choose_act_exponents``). With ``learn_bias`` the phase
also learns a correction of each layer's bias (``with_shifts``), the one continuous
quantity of a power-of-two unit left to it. Where neither applies and every activation
of the unit is power-of-two, the phase is skipped when it provably changes nothing the
model uses: ``act_drift_bound`` bounds how far its Adam can move any ``t``, and below
the distance to a rounding boundary no ``round(t)`` changes (``act_phase_moves_nothing``;
at the default 500 steps and ``lr_a`` the bound is 0.25).
"""
import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rapq_jax import fake_quant, objective, parallel, power, rounding
from rapq_jax.config import PTQConfig
from rapq_jax.network import unit_apply
from rapq_jax.units import Unit

REPORT_EVERY = 100


class UnitResult(NamedTuple):
  """Learned states of one unit, its loss curves (``{phase: [(step, loss)]}``), the
  moves of its activation exponents chosen by loss (``{point: k}``), how many output
  channels of each layer moved their weight exponent (``{role: count}``; the moves are
  empty when their choice is off) and how many activation steps ran (0 where the phase
  was off or skipped, ``act_phase_moves_nothing``)."""
  wstates: dict
  astates: dict
  history: dict
  seconds: float
  act_moves: dict
  weight_moves: dict
  act_steps: int


def structural(unit: Unit) -> Unit:
  """The unit without names, so equally shaped units share compiled steps."""
  return dataclasses.replace(
      unit, name="", layers=tuple(dataclasses.replace(l, path="") for l in unit.layers))


def _split_states(wstates, keys):
  """``(train, frozen)``: the entries ``keys`` of each layer's weight state, and the rest."""
  train = {r: {k: v for k, v in s.items() if k in keys} for r, s in wstates.items()}
  frozen = {r: {k: v for k, v in s.items() if k not in keys} for r, s in wstates.items()}
  return train, frozen


def _merge(a, b):
  return {r: {**a[r], **b[r]} for r in a}


def _batch(xs, ys, key, batch_size, n):
  """A batch of rows drawn from the first ``n`` (the rest is padding), split over the
  devices: the same global indices on any device count."""
  idx = jax.random.randint(key, (batch_size,), 0, n)
  return parallel.constrain_rows(xs[idx]), parallel.constrain_rows(ys[idx])


def place(xs, ys, tree):
  """The unit's cached inputs/targets xs, ys [N, ...] split along rows over the devices
  and ``tree`` (parameters, states) replicated: the placement of the steps' own outputs,
  so inputs placed here compile each step once (unplaced ones compile it twice)."""
  return parallel.shard_rows(xs), parallel.shard_rows(ys), parallel.replicate(tree)


class Budget(NamedTuple):
  """The step counts the phases' schedules read, as int32 scalars in the phase states:
  the compiled steps do not depend on them, so one compilation serves every budget (and
  the persistent compilation cache serves a run at another budget)."""
  weight_iters: jax.Array
  warmup_steps: jax.Array     # rounding.warmup_steps: AdaRound's regulariser is off before
  exp_warm_iters: jax.Array
  act_iters: jax.Array


def budget(cfg: PTQConfig) -> Budget:
  """``cfg``'s step counts, placed replicated on the devices."""
  counts = (cfg.weight_iters, rounding.warmup_steps(cfg.weight_iters, cfg.warmup),
            cfg.exp_warm_iters, cfg.act_iters)
  return parallel.replicate(Budget(*(np.int32(c) for c in counts)))


def exponent_temperature(it: jax.Array, steps: Budget, cfg: PTQConfig) -> jax.Array:
  """The temperature of the exponent logits' regulariser at step ``it`` of the weight
  stage: held at ``b_start`` with ``exp_b_hold`` (the official schedule), else annealed
  ``b_start -> b_end`` over the ``exp_warm_iters`` steps."""
  if cfg.exp_b_hold:
    return jnp.float32(cfg.b_start)
  return rounding.linear(it, jnp.maximum(steps.exp_warm_iters, 1), cfg.b_start, cfg.b_end)


def act_learning_rate(it: jax.Array, steps: Budget, cfg: PTQConfig) -> jax.Array:
  """``lr_a`` at step ``it`` of the activation phase, cosine-decayed to 0 over
  ``act_iters`` steps (the arithmetic of ``optax.cosine_decay_schedule``, whose step count
  must be a python int)."""
  decay = jnp.maximum(steps.act_iters, 1)
  return cfg.lr_a * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(it, decay) / decay)))


class WeightPhaseState(NamedTuple):
  """State of a weight phase: the entries of each layer's quantizer state it trains
  (``alpha``, and ``v`` while the exponent learns), their optimizer state, and the
  entries it holds fixed."""
  train: dict
  opt_state: optax.OptState
  frozen: dict
  steps: Budget

  @property
  def wstates(self) -> dict:
    """The layers' whole quantizer states."""
    return _merge(self.train, self.frozen)


class ActPhaseState(NamedTuple):
  """State of the activation phase: the activation quantizer states, the bias
  corrections it learns per layer (``{role: [O]}``, empty unless ``learn_bias``) and
  their optimizer state."""
  astates: dict
  shifts: dict
  opt_state: optax.OptState
  steps: Budget


class Phase(NamedTuple):
  """A reconstruction phase as a pair of pure functions, as an optax transformation:
  ``init(states) -> state`` (placed replicated on the devices) and the jitted
  ``step(state, ...inputs, key, it) -> (state, loss)``."""
  init: Callable
  step: Callable


@functools.lru_cache(maxsize=None)
def weight_phase(unit: Unit, wspecs: tuple, aspecs: tuple, cfg: PTQConfig, p: float,
                 learn_v: bool, n: int) -> Phase:
  """The weight phase of a ``structural`` unit (specs as sorted item tuples, ``n`` real
  cache rows): ``init(wstates) -> WeightPhaseState`` training ``alpha``, and ``v`` when
  ``learn_v``; ``step(state, astates, params, bn_targets, xs, ys, key, it) -> (state,
  reconstruction loss)``."""
  wspecs, aspecs = dict(wspecs), dict(aspecs)
  keys = ("alpha", "v") if learn_v else ("alpha",)
  # alpha and the exponent logits v learn at their own rates; alpha's is scaled by
  # rounding.lr_scale (Adam's update is linear in its learning rate).
  opt = optax.multi_transform({"alpha": optax.adam(cfg.lr_w), "v": optax.adam(cfg.lr_exp)},
                              lambda tree: {r: {k: k for k in s} for r, s in tree.items()})
  points = sorted(aspecs)
  prob = cfg.weight_phase_act_quant

  def loss_fn(train, frozen, astates, params, targets, x, y_t, it, steps, key):
    ws = _merge(train, frozen)
    wq, aq_all = fake_quant.hooks(ws, astates, wspecs, aspecs, soft=True, acts_on=True)

    def aq(name, h):
      if prob == 0.0:
        return h
      if prob == 1.0:
        return aq_all(name, h)
      keep = jax.random.bernoulli(jax.random.fold_in(key, points.index(name)), prob, h.shape)
      return jnp.where(keep, aq_all(name, h), h)

    y, pre = unit_apply(unit, params, x, wq, aq)
    rec = objective.lp_loss(y, y_t, p)
    b_round = rounding.temperature(it, steps.weight_iters, steps.warmup_steps,
                                   start_b=cfg.b_start, end_b=cfg.b_end)
    reg = sum(rounding.regularizer(s["alpha"], b_round) for s in train.values())
    active = rounding.regularizer_active(it, steps.warmup_steps)
    loss = rec + cfg.round_weight * active * reg
    if learn_v:
      b_exp = exponent_temperature(it, steps, cfg)
      reg_v = sum(rounding.regularizer(s["v"], b_exp) for s in train.values())
      loss = loss + cfg.round_weight * cfg.exp_reg_factor * reg_v
    if cfg.bn_stats_weight:
      loss = loss + cfg.bn_stats_weight * objective.bn_stats_loss(pre, targets)
    return loss, rec

  def init(wstates):
    train, frozen = _split_states(wstates, keys)
    return WeightPhaseState(train, parallel.replicate(opt.init(train)), frozen, budget(cfg))

  @jax.jit
  def step(state, astates, params, targets, xs, ys, key, it):
    kb, kd = jax.random.split(jax.random.fold_in(key, it))
    x, y_t = _batch(xs, ys, kb, cfg.batch_size, n)
    (loss, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.train, state.frozen, astates, params, targets, x, y_t, it, state.steps, kd)
    updates, opt_state = opt.update(grads, state.opt_state, state.train)
    scale = rounding.lr_scale(cfg.lr_w_ref_iters, state.steps.weight_iters)
    updates = {r: {k: u * scale if k == "alpha" else u for k, u in s.items()}
               for r, s in updates.items()}
    return state._replace(train=optax.apply_updates(state.train, updates),
                          opt_state=opt_state), rec

  return Phase(init, step)


# The activation phase's Adam (optax's defaults), named for ``act_drift_bound``.
ADAM_B1, ADAM_B2 = 0.9, 0.999
# Room left below a rounding boundary for float32 round-off in the phase's arithmetic
# (500 Adam steps err by orders of magnitude less).
DRIFT_MARGIN = 1e-3


def act_drift_bound(cfg: PTQConfig) -> float:
  """An upper bound on how far the activation phase moves any one parameter, whatever
  its gradients: Adam's step ``lr_t * m_hat / (sqrt(v_hat) + eps)`` has, by
  Cauchy-Schwarz on ``m_t = (1 - b1) sum_k b1^k g_(t-k)`` against
  ``v_t = (1 - b2) sum_k b2^k g_(t-k)^2``, ``|m_t| <= (1 - b1) sqrt(S_t v_t / (1 - b2))``
  with ``S_t = sum_(k<t) (b1^2 / b2)^k``; with the bias corrections the step is at most
  ``lr_t (1 - b1) sqrt(S_t (1 - b2^t) / (1 - b2)) / (1 - b1^t)`` (``eps`` only shrinks
  it). Summed over the phase's learning rates (``act_learning_rate``)."""
  t = np.arange(1, cfg.act_iters + 1, dtype=np.float64)
  lr = np.asarray(act_learning_rate(jnp.arange(cfg.act_iters), budget(cfg), cfg), np.float64)
  r = ADAM_B1 ** 2 / ADAM_B2
  s = (1 - r ** t) / (1 - r)
  step = (1 - ADAM_B1) * np.sqrt(s * (1 - ADAM_B2 ** t) / (1 - ADAM_B2)) / (1 - ADAM_B1 ** t)
  return float(np.sum(lr * step))


def act_optimizer(cfg: PTQConfig) -> optax.GradientTransformation:
  """The activation phase's Adam, its learning rate injected per step
  (``act_learning_rate``)."""
  return optax.inject_hyperparams(optax.adam)(learning_rate=cfg.lr_a, b1=ADAM_B1, b2=ADAM_B2)


def act_phase_moves_nothing(astates: dict, aspecs: dict, cfg: PTQConfig) -> bool:
  """Whether the activation phase provably leaves the model as it is: it learns no bias
  corrections, every activation quantizer is power-of-two (the model uses ``round(t)``
  only), and no ``t`` is within ``act_drift_bound`` of a rounding boundary."""
  if cfg.learn_bias or not all(spec.pot for spec in aspecs.values()):
    return False
  frac = max((abs(float(a["exp"]) - round(float(a["exp"]))) for a in astates.values()),
             default=0.0)
  return frac + act_drift_bound(cfg) < 0.5 - DRIFT_MARGIN


@functools.lru_cache(maxsize=None)
def act_phase(unit: Unit, wspecs: tuple, aspecs: tuple, cfg: PTQConfig, p: float,
              n: int) -> Phase:
  """The activation phase, as ``weight_phase``: ``init(astates, wstates) ->
  ActPhaseState``; ``step(state, wstates, params, xs, ys, key, it) -> (state, loss)`` with
  hard weights. With ``cfg.learn_bias`` it also learns a correction of each layer's bias
  (at ``lr_bias``, on the same cosine schedule as ``lr_a``), which ``with_shifts`` puts
  into the weight states."""
  wspecs, aspecs = dict(wspecs), dict(aspecs)
  opt = act_optimizer(cfg)

  def loss_fn(train, wstates, params, x, y_t):
    astates, shifts = train
    wq, aq = fake_quant.hooks(with_shifts(wstates, shifts), astates, wspecs, aspecs,
                              soft=False, acts_on=True)
    return objective.lp_loss(unit_apply(unit, params, x, wq, aq)[0], y_t, p)

  def init(astates, wstates):
    shifts = parallel.replicate({r: jnp.zeros_like(s["exp"]) for r, s in wstates.items()}
                                if cfg.learn_bias else {})
    return ActPhaseState(astates, shifts, parallel.replicate(opt.init((astates, shifts))),
                         budget(cfg))

  @jax.jit
  def step(state, wstates, params, xs, ys, key, it):
    x, y_t = _batch(xs, ys, jax.random.fold_in(key, it), cfg.batch_size, n)
    train = (state.astates, state.shifts)
    loss, grads = jax.value_and_grad(loss_fn)(train, wstates, params, x, y_t)
    lr = act_learning_rate(it, state.steps, cfg)
    opt_state = state.opt_state._replace(
        hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    (d_a, d_b), opt_state = opt.update(grads, opt_state, train)
    # One Adam for both; the bias corrections' updates are rescaled to lr_bias (Adam's
    # update is linear in its learning rate).
    d_b = jax.tree.map(lambda u: u * (cfg.lr_bias / cfg.lr_a), d_b)
    return state._replace(astates=optax.apply_updates(state.astates, d_a),
                          shifts=optax.apply_updates(state.shifts, d_b),
                          opt_state=opt_state), loss

  return Phase(init, step)


def with_shifts(wstates: dict, shifts: dict) -> dict:
  """``wstates`` with each layer's learned bias correction (``shifts[role]``, [O]) added
  to the ``bias_shift`` it holds (``fake_quant.corrected_bias``)."""
  return {r: ({**s, "bias_shift": s.get("bias_shift", 0.0) + shifts[r]} if r in shifts else s)
          for r, s in wstates.items()}


CHOICE_ROWS = 256  # rows per forward pass when a whole cache is scored


def _chunked(a):
  """``a`` [N, ...] zero-padded to whole chunks of ``CHOICE_ROWS`` rows, as
  [chunks, CHOICE_ROWS, ...] (padding rows are False in a mask chunked alike)."""
  chunks = -(-a.shape[0] // CHOICE_ROWS)
  a = jnp.pad(a, [(0, chunks * CHOICE_ROWS - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  return a.reshape((chunks, CHOICE_ROWS) + a.shape[1:])


@functools.lru_cache(maxsize=None)
def _cache_loss(unit: Unit, wspecs: tuple, aspecs: tuple, p: float, n: int):
  """Jitted: the unit's Lp reconstruction loss (hard weights, quantized activations) over
  the first ``n`` rows of its whole cache, ``CHOICE_ROWS`` rows per forward pass."""
  wspecs, aspecs = dict(wspecs), dict(aspecs)

  @jax.jit
  def loss(astates, wstates, params, xs, ys):
    wq, aq = fake_quant.hooks(wstates, astates, wspecs, aspecs, soft=False, acts_on=True)
    mask = _chunked(jnp.arange(xs.shape[0]) < n)

    def chunk_loss(args):
      x, y_t, m = args
      err = jnp.sum(power.abs_pow(unit_apply(unit, params, x, wq, aq)[0] - y_t, p), axis=-1)
      return jnp.sum(jnp.mean(err.reshape(err.shape[0], -1), axis=1) * m)

    return jnp.sum(jax.lax.map(chunk_loss, (_chunked(xs), _chunked(ys), mask))) / n

  return loss


def choose_act_exponents(loss_fn, astates: dict, aspecs: dict, window: int,
                         max_sweeps: int = 3) -> tuple[dict, dict]:
  """Coordinate descent over the unit's power-of-two activation exponents: each in turn
  takes whichever of ``round(t) + k``, ``|k| <= window``, gives the lowest
  ``loss_fn(astates)`` (a strict improvement is needed to move), until a sweep moves
  none or after ``max_sweeps`` sweeps.

  Returns:
    (astates with integral ``t``, {point: net move}).
  """
  names = sorted(n for n, spec in aspecs.items() if spec.pot)
  current = {n: {"exp": jnp.round(a["exp"])} if n in names else a for n, a in astates.items()}
  best = float(loss_fn(current))
  for _ in range(max_sweeps):
    moved = False
    for name in names:
      base = current[name]["exp"]
      for k in [k for k in range(-window, window + 1) if k]:
        trial = {**current, name: {"exp": base + k}}
        value = float(loss_fn(trial))
        if value < best:
          best, current, moved = value, trial, True
    if not moved:
      break
  moves = {n: int(current[n]["exp"] - jnp.round(astates[n]["exp"])) for n in names}
  return current, moves


@functools.lru_cache(maxsize=None)
def _channel_errors(unit: Unit, wspecs: tuple, aspecs: tuple, role: str, p: float, n: int,
                    acts_on: bool, window: int):
  """Jitted: ``errors(wstates, astates, params, xs) -> [2 * window + 1, O]``, for each
  exponent offset ``k = -window .. window`` of layer ``role`` (``k = 0``: its current
  grid and learned hard rounding; others: round to nearest on the moved grid) the Lp
  error of each of its output channels, before the activation, against
  its FP kernel on the same input, summed over the first ``n`` rows of the cache. The
  other layers use their hard states; activations are quantized when ``acts_on``."""
  wspecs, aspecs = dict(wspecs), dict(aspecs)

  @jax.jit
  def errors(wstates, astates, params, xs):
    kernel = params[role]["kernel"]
    nearest = {k: v for k, v in wstates[role].items() if k != "alpha"}
    kernels = [kernel] + [fake_quant.weight_fake_quant(
        kernel, wstates[role] if k == 0 else {**nearest, "exp": nearest["exp"] + k},
        wspecs[role], soft=False) for k in range(-window, window + 1)]
    hard, aq = fake_quant.hooks(wstates, astates, wspecs, aspecs, soft=False, acts_on=acts_on)

    def output(x, own):
      def wq(r, layer):
        return {**hard(r, layer), "kernel": own} if r == role else hard(r, layer)
      return unit_apply(unit, params, x, wq, aq)[1][role]

    mask = _chunked(jnp.arange(xs.shape[0]) < n)

    def chunk_errors(args):
      x, m = args
      ref = output(x, kernels[0])
      m = m.reshape((-1,) + (1,) * (ref.ndim - 1))
      return jnp.stack([jnp.sum(power.abs_pow(output(x, k) - ref, p) * m,
                                axis=tuple(range(ref.ndim - 1))) for k in kernels[1:]])

    return jnp.sum(jax.lax.map(chunk_errors, (_chunked(xs), mask)), axis=0)

  return errors


def choose_weight_exponents(unit: Unit, errors_for, params: dict, wstates: dict,
                            wspecs: dict, window: int) -> tuple[dict, dict]:
  """Per output channel, the weight exponent ``e + k`` (``|k| <= window``) with the
  smallest ``errors_for(role, wstates)[k + window, channel]``, a strict improvement on
  ``k = 0`` needed to move; the PoT layers in the unit's order, each scored with the
  choices of the layers before it. Moved channels restart their rounding
  (``fake_quant.move_exponents``).

  Returns:
    (weight states, {role: number of channels moved}).
  """
  moved = {}
  for layer in unit.layers:
    spec = wspecs[layer.role]
    if not spec.pot or "v" in wstates[layer.role]:
      continue
    err = errors_for(layer.role, wstates)
    best = jnp.argmin(err, axis=0)
    moves = jnp.where(jnp.min(err, axis=0) < err[window], best - window, 0)
    state = fake_quant.move_exponents(params[layer.role]["kernel"], wstates[layer.role],
                                      spec, moves)
    moved[layer.role] = int(jnp.sum(state["exp"] != wstates[layer.role]["exp"]))
    wstates = {**wstates, layer.role: state}
  return wstates, moved


_harden = jax.jit(fake_quant.harden_exponent, static_argnames=("spec", "reinit_alpha"))


def _exponent_state(train) -> str:
  """Progress text: share of exponent logits already saturated to 0 or 1."""
  h = np.concatenate([np.asarray(rounding.rectified_sigmoid(s["v"])) for s in train.values()])
  return f"{np.mean((h == 0) | (h == 1)):.0%} exp set"


def _check_finite(value: float, unit: str, phase: str, it: int):
  if not np.isfinite(value):
    raise FloatingPointError(
        f"reconstruction of unit {unit!r} produced a non-finite loss ({value}) in the "
        f"{phase} phase at iteration {it}")


def reconstruct_unit(unit: Unit, params: dict, bn_targets: dict, wstates: dict,
                     astates: dict, wspecs: dict, aspecs: dict, xs, ys, cfg: PTQConfig,
                     p: float, key, *, progress: bool = True, weights: bool = True,
                     acts: bool = True) -> UnitResult:
  """Reconstructs one unit: its weight stage, then its activation stage (``weights`` /
  ``acts`` False skips one; ``ptq`` runs them in separate passes under the 'official'
  protocol).

  Args:
    unit, params, bn_targets: the folded unit (``Network`` entries).
    wstates / astates: initial quantizer states per layer role / activation point.
    wspecs / aspecs: their static ``WeightSpec`` / ``ActSpec``.
    xs: float32 [N, ...] unit inputs from the quantized network; ys: FP targets. Both
      are placed split along rows over ``jax.devices()`` (zero-padded to a multiple of
      the device count; batches are drawn from the N real rows only).
    p: Lp exponent of the reconstruction loss.
    key: PRNG key for batch sampling.
  Returns:
    UnitResult with exponents exactly integral (PoT modes) and weight rounding learned.
  Raises:
    ValueError: ``cfg.batch_size`` is not divisible by the device count.
  """
  start = time.perf_counter()
  parallel.check_batch(cfg.batch_size)
  n = xs.shape[0]
  xs, ys, (params, bn_targets, wstates, astates) = place(
      xs, ys, (params, bn_targets, wstates, astates))
  shape = structural(unit)
  ws_t, as_t = tuple(sorted(wspecs.items())), tuple(sorted(aspecs.items()))
  history = {"weights": [], "acts": []}
  kw, ka = jax.random.split(key)
  learn_v = any("v" in s for s in wstates.values())
  phases = []   # (name, first step, last step, learns v)
  choose_at = None
  if weights:
    if learn_v:
      phases.append(("exponent", 0, min(cfg.exp_warm_iters, cfg.weight_iters), True))
    first = phases[0][2] if phases else 0
    if cfg.weight_exp_window and not learn_v:
      choose_at = first + round(cfg.weight_exp_at * (cfg.weight_iters - first))
      phases.append(("rounding", first, choose_at, False))
      first = choose_at
    phases.append(("rounding", first, cfg.weight_iters, False))
  acts = acts and bool(aspecs)
  act_steps = cfg.act_iters if acts and not act_phase_moves_nothing(astates, aspecs, cfg) else 0
  done_w = cfg.weight_iters if weights else 0     # progress-bar steps before the activations
  bar = tqdm(total=done_w + act_steps, desc=f"{unit.name:>14}",
             disable=None if progress else True,  # None: a bar on a terminal only
             leave=False, dynamic_ncols=True)
  weight_moves = {}
  for phase, first, last, with_v in phases:
    if first == choose_at:
      errors = {role: _channel_errors(shape, ws_t, as_t, role, p, n,
                                      cfg.weight_phase_act_quant > 0, cfg.weight_exp_window)
                for role in wspecs}
      wstates, weight_moves = choose_weight_exponents(
          unit, lambda role, ws: errors[role](ws, astates, params, xs), params, wstates,
          wspecs, cfg.weight_exp_window)
      choose_at = None                            # once, also when it is step 0
    if first >= last:
      continue
    phase_fns = weight_phase(shape, ws_t, as_t, cfg, p, with_v, n)
    state = phase_fns.init(wstates)
    for it in range(first, last):
      state, rec = phase_fns.step(state, astates, params, bn_targets, xs, ys, kw, it)
      if (it + 1) % REPORT_EVERY == 0 or it + 1 == last:
        value = float(rec)
        _check_finite(value, unit.name, phase, it)
        history["weights"].append((it + 1, value))
        post = {"loss": f"{value:.4g}", "phase": phase}
        if with_v:
          post["exp"] = _exponent_state(state.train)
        bar.set_postfix(post, refresh=False)
        bar.update((it + 1) - bar.n)
    wstates = state.wstates
    if with_v:
      wstates = {r: _harden(params[r]["kernel"], s, wspecs[r],
                            reinit_alpha=cfg.reinit_alpha_on_harden)
                 for r, s in wstates.items()}
  if act_steps:
    phase_fns = act_phase(shape, ws_t, as_t, cfg, p, n)
    state = phase_fns.init(astates, wstates)
    for it in range(act_steps):
      state, loss = phase_fns.step(state, wstates, params, xs, ys, ka, it)
      if (it + 1) % REPORT_EVERY == 0 or it + 1 == act_steps:
        value = float(loss)
        _check_finite(value, unit.name, "activation", it)
        history["acts"].append((it + 1, value))
        bar.set_postfix({"loss": f"{value:.4g}", "phase": "activations"}, refresh=False)
        bar.update(done_w + it + 1 - bar.n)
    astates, wstates = state.astates, with_shifts(wstates, state.shifts)
  moves = {}
  if acts and cfg.act_exp_window:
    loss = _cache_loss(shape, ws_t, as_t, p, n)
    astates, moves = choose_act_exponents(
        lambda a: loss(a, wstates, params, xs, ys), astates, aspecs, cfg.act_exp_window)
  bar.close()
  return UnitResult(wstates, astates, history, time.perf_counter() - start, moves,
                    weight_moves, act_steps)
