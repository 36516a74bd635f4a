"""Fake quantization: the learnable weight and activation quantizers reconstruction trains
through, and the exact integers they give the deployed model (``quantized``).

Weight quantizer state (a dict pytree per layer; ``O`` output channels, last axis):

* ``exp``: float32 [O], base log2 step size (the exponent). Integer-valued for power-of-two modes
  (``e0``; for RAPQ the floor of the Lp scale's log2), real for float-scale BRECQ.
* ``v``: float32 [O], RAPQ only, until hardened: the exponent is ``e0 + h(v)``.
* ``alpha``: float32, kernel shape: AdaRound logits (absent for round-to-nearest).
* ``lo``: float32 [O], clipping minimum from the Lp search, giving the integer zero point
  ``clip(round(-lo / scale), 0, 2**b - 1)`` for asymmetric (unsigned) weights.

Activation quantizer state: ``{'exp': float32 scalar}``, the log2 step size (the same
word as the weights'). Power-of-two modes use ``2**round(exp)`` forward with a
straight-through gradient on ``exp``; float mode uses ``2**exp``.
"""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from rapq_jax import pot, power, rounding


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """Static description of a weight quantizer."""
  bits: int
  pot: bool = True
  signed: bool = False   # signed symmetric; else unsigned with integer zero point


@dataclasses.dataclass(frozen=True)
class ActSpec:
  """Static description of a per-tensor activation quantizer."""
  bits: int
  signed: bool = False
  pot: bool = True


# State fields under the names an older version saved them (resumed runs): the exponent
# was 'log2s' in weight states and 't' in activation states.
OLD_STATE_NAMES = {"log2s": "exp", "t": "exp"}


def current_state_names(states: dict) -> dict:
  """A unit's states ``{'w': {layer: state}, 'a': {point: state}}`` with every field of
  ``OLD_STATE_NAMES`` under its name now."""
  rename = lambda state: {OLD_STATE_NAMES.get(k, k): v for k, v in state.items()}
  return {group: {name: rename(state) for name, state in members.items()}
          for group, members in states.items()}


def spec_items(specs: dict) -> tuple:
  """Hashable form of a network's specs ``{unit: (wspecs, aspecs)}``, for the static
  arguments of jitted functions (``specs_of`` reads it back)."""
  return tuple((u, tuple(sorted(w.items())), tuple(sorted(a.items())))
               for u, (w, a) in sorted(specs.items()))


def specs_of(items: tuple) -> dict:
  """The ``{unit: (wspecs, aspecs)}`` that ``spec_items`` made ``items`` of."""
  return {u: (dict(w), dict(a)) for u, w, a in items}


def _qrange(spec) -> tuple[int, int]:
  return pot.int_range(spec.bits, spec.signed)


# ---------------------------------------------------------------- weights

def init_weight(w: chex.Array, spec: WeightSpec, *, learn_exponent: bool = False,
                learn_rounding: bool = True, p: float = 2.4,
                exponent_choice: str = "nearest") -> dict:
  """Lp-initialised weight quantizer for kernel ``w`` (output channels last).

  PoT: ``exp`` is an integer exponent per channel: the Lp scale's ``nearest`` in the
  log domain, or (``exponent_choice='lp'``) whichever of its floor and ceil gives the
  smaller round-to-nearest Lp error; with ``learn_exponent`` it is the floor with ``v``
  set so that ``h(v)`` equals the fractional part (the soft scale then starts at the Lp
  scale). Float: ``exp = log2(lp scale)``. ``alpha`` starts so that the soft rounding
  reproduces ``w``.
  """
  lp = pot.lp_scale_search(w, spec.bits, signed=spec.signed, per_channel=True, p=p)
  scale = jnp.where(lp.scale > 0, lp.scale, pot.exp2(pot.EXP_MIN))
  state = {"lo": lp.lo}
  if not spec.pot:
    state["exp"] = jnp.log2(scale)
  elif learn_exponent:
    e0 = pot.log2_exponents(scale)[1]  # exact floor (XLA's log2 is inexact at 2**k)
    state["exp"] = e0.astype(jnp.float32)
    state["v"] = rounding.init_logits(jnp.log2(scale / pot.exp2(e0)))
  elif exponent_choice == "nearest":
    state["exp"] = pot.log2_exponents(scale)[0].astype(jnp.float32)
  elif exponent_choice == "lp":
    _, lo_e, hi_e = pot.log2_exponents(scale)
    axes = tuple(range(w.ndim - 1))

    def err(e):
      st = {"lo": lp.lo, "exp": e.astype(jnp.float32)}
      return jnp.mean(power.abs_pow(weight_fake_quant(w, st, spec, soft=False) - w, p),
                      axis=axes)

    state["exp"] = jnp.where(err(hi_e) < err(lo_e), hi_e, lo_e).astype(jnp.float32)
  elif exponent_choice == "grid":
    state["exp"], state["lo"] = best_grid(w, scale, spec, p)
  else:
    raise ValueError(f"exponent_choice = {exponent_choice!r}: expected 'nearest', 'lp' or "
                     "'grid'")
  if learn_rounding:
    state["alpha"] = _alpha_for(w, weight_scale(state, spec))
  return state


def best_grid(w: chex.Array, scale: chex.Array, spec: WeightSpec, p: float):
  """The power-of-two grid with the least round-to-nearest Lp error per output channel:
  its exponent among ``floor - 1``, ``floor`` and ``ceil`` of ``log2(scale)`` (the float
  Lp scale) and, for unsigned weights, its zero point among all ``0 .. 2**b - 1`` (the
  float Lp range's zero point, ``round(-lo / 2**e)``, is only best for a float scale).

  Returns:
    (exp float32 [O] integral, lo float32 [O] = ``-zp * 2**e``, from which
    ``zero_point`` recovers the chosen zero point exactly).
  """
  qmin, qmax = _qrange(spec)
  _, floor_e, ceil_e = pot.log2_exponents(scale)
  exps = pot.clip_exponent(jnp.stack([floor_e - 1, floor_e, ceil_e]))   # [3, O]
  zps = jnp.zeros((1,)) if spec.signed else jnp.arange(qmax + 1, dtype=jnp.float32)
  axes = tuple(range(w.ndim - 1))

  def err(k):
    e, zp = exps[k // zps.shape[0]], zps[k % zps.shape[0]]
    s = pot.exp2(e)
    q = jnp.clip(jnp.round(w / s) + zp, qmin, qmax)
    return jnp.mean(power.abs_pow((q - zp) * s - w, p), axis=axes)

  # Sequential over candidates, as lp_scale_search: a vmap would hold one copy of w each.
  errs = jax.lax.map(err, jnp.arange(exps.shape[0] * zps.shape[0]))      # [K, O]
  best = jnp.argmin(errs, axis=0)
  e = jnp.take_along_axis(exps, (best // zps.shape[0])[None], axis=0)[0]
  zp = zps[best % zps.shape[0]]
  return e.astype(jnp.float32), -zp * pot.exp2(e)


def _alpha_for(w, scale):
  x = w / scale
  return rounding.init_logits(x - jnp.floor(x))


def reset_rounding(w: chex.Array, state: dict, spec: WeightSpec) -> dict:
  """Restarts the AdaRound logits on the state's current grid (after its exponent
  moved), so the soft rounding again reproduces ``w``."""
  if "alpha" not in state:
    return state
  return {**state, "alpha": _alpha_for(w, weight_scale(state, spec))}


def move_exponents(w: chex.Array, state: dict, spec: WeightSpec, moves: chex.Array) -> dict:
  """The integer exponents of a PoT weight quantizer moved by ``moves`` (int [O], kept
  in ``[EXP_MIN, EXP_MAX]``); the AdaRound logits of the channels that moved restart
  on their new grid (``reset_rounding``), the others keep what they learned."""
  chex.assert_shape(moves, state["exp"].shape)
  new = {**state, "exp": pot.clip_exponent(state["exp"] + moves).astype(jnp.float32)}
  if "alpha" not in state:
    return new
  moved = new["exp"] != state["exp"]
  new["alpha"] = jnp.where(moved, _alpha_for(w, weight_scale(new, spec)), state["alpha"])
  return new


def weight_scale(state: dict, spec: WeightSpec) -> chex.Array:
  """Per-channel step size [O]: ``2**(e0 + h(v))`` while the exponent is soft, exactly
  ``2**e`` once it is an integer, ``2**exp`` for float scales."""
  if not spec.pot:
    return jnp.exp2(state["exp"])
  base = pot.exp2(state["exp"].astype(jnp.int32))
  if "v" in state:
    return base * jnp.exp2(rounding.rectified_sigmoid(state["v"]))
  return base


def zero_point(state: dict, spec: WeightSpec, scale: chex.Array) -> chex.Array:
  """Integer zero point per channel (float-typed integers; 0 when signed)."""
  if spec.signed:
    return jnp.zeros_like(scale)
  _, qmax = _qrange(spec)
  return jax.lax.stop_gradient(jnp.clip(jnp.round(-state["lo"] / scale), 0, qmax))


def weight_fake_quant(w: chex.Array, state: dict, spec: WeightSpec, *,
                      soft: bool) -> chex.Array:
  """Quantized-dequantized kernel. With ``alpha``: ``floor(w/s) + h(alpha)`` (soft) or
  ``+ (alpha >= 0)`` (hard); without it: round to nearest."""
  qmin, qmax = _qrange(spec)
  scale = weight_scale(state, spec)
  zp = zero_point(state, spec, scale)
  x = w / scale
  if "alpha" in state:
    r = rounding.rectified_sigmoid(state["alpha"]) if soft else rounding.hard_choice(state["alpha"])
    q = jnp.floor(x) + r
  else:
    q = pot.round_ste(x)
  q = q + zp
  # Clamp with gradient 1 on all of [qmin, qmax] (jnp.clip passes 1/2 at the ends).
  q = jnp.where(q < qmin, qmin, jnp.where(q > qmax, qmax, q))
  return (q - zp) * scale


def corrected_bias(bias: chex.Array, state: dict) -> chex.Array:
  """The layer's bias plus the correction ``bias_shift`` [O] its quantizer state holds
  once an activation phase has learned one (``PTQConfig.learn_bias``); the deployed model
  rounds the sum onto its accumulator grid like any bias."""
  return bias + state["bias_shift"] if "bias_shift" in state else bias


def harden_exponent(w: chex.Array, state: dict, spec: WeightSpec, *,
                    reinit_alpha: bool = True) -> dict:
  """Ends RAPQ's exponent learning: ``e = e0 + (v >= 0)``, an exact integer, and drops
  ``v``. With ``reinit_alpha`` the rounding logits restart on the new integer grid."""
  e = pot.clip_exponent(state["exp"] + rounding.hard_choice(state["v"]))
  new = {k: val for k, val in state.items() if k != "v"}
  new["exp"] = e.astype(jnp.float32)
  return reset_rounding(w, new, spec) if reinit_alpha else new


def weight_integers(w: chex.Array, state: dict, spec: WeightSpec):
  """Final integers of a PoT weight quantizer with a hard exponent.

  Returns:
    (q kernel-shaped 8-bit container in the spec's range: int8 when signed, uint8
    when unsigned; e int32 [O]; zp int32 [O]).
  """
  if not spec.pot or "v" in state:
    raise ValueError("weight_integers needs a power-of-two quantizer with a hardened exponent")
  qmin, qmax = _qrange(spec)
  e = pot.clip_exponent(state["exp"])
  scale = pot.exp2(e)
  zp = zero_point(state, spec, scale)
  x = w / scale
  if "alpha" in state:
    q = jnp.floor(x) + rounding.hard_choice(state["alpha"])
  else:
    q = jnp.round(x)
  q = jnp.clip(q + zp, qmin, qmax)
  return q.astype(jnp.int8 if spec.signed else jnp.uint8), e, zp.astype(jnp.int32)


# ------------------------------------------------------------ activations

def init_act(x: chex.Array, spec: ActSpec, p: float = 2.4,
             exponent_choice: str = "nearest") -> dict:
  """Per-tensor Lp initialisation. PoT: the integer exponent nearest the Lp scale in the
  log domain, or (``exponent_choice='lp'``) whichever of its floor and ceil quantizes
  ``x`` with the smaller Lp error, as ``init_weight`` chooses per channel."""
  lp = pot.lp_scale_search(x, spec.bits, signed=spec.signed, per_channel=False, p=p)
  if spec.pot:
    nearest, lo_e, hi_e = pot.log2_exponents(lp.scale)
    if exponent_choice == "nearest":
      return {"exp": nearest.astype(jnp.float32)}
    if exponent_choice != "lp":
      raise ValueError(f"exponent_choice = {exponent_choice!r}: expected 'nearest' or 'lp'")

    def err(e):
      return jnp.mean(power.abs_pow(
          act_fake_quant(x, {"exp": e.astype(jnp.float32)}, spec) - x, p))

    return {"exp": jnp.where(err(hi_e) < err(lo_e), hi_e, lo_e).astype(jnp.float32)}
  return {"exp": jnp.log2(jnp.where(lp.scale > 0, lp.scale, pot.exp2(pot.EXP_MIN)))}


def act_scale(state: dict, spec: ActSpec) -> chex.Array:
  """Step size: exactly ``2**round(exp)`` forward with ``d/dexp = scale * ln 2`` (PoT), or
  ``2**exp`` (float)."""
  e = state["exp"]
  if not spec.pot:
    return jnp.exp2(e)
  exact = pot.exp2(pot.clip_exponent(jnp.round(e)))
  return exact * (1.0 + (e - jax.lax.stop_gradient(e)) * math.log(2.0))


def act_fake_quant(x: chex.Array, state: dict, spec: ActSpec) -> chex.Array:
  """Per-tensor fake quantization (zero point 0), straight-through rounding."""
  return pot.fake_quant_scaled(x, act_scale(state, spec), spec.bits, signed=spec.signed)


def hooks(wstates, astates, wspecs, aspecs, *, soft: bool, acts_on: bool):
  """``(wq, aq)``: the weight and activation hooks of ``network.unit_apply`` from the
  quantizer states and specs of one unit (``soft``: AdaRound's soft rounding;
  ``acts_on=False``: activations pass unquantized)."""
  def wq(role, layer):
    return {"kernel": weight_fake_quant(layer["kernel"], wstates[role], wspecs[role], soft=soft),
            "bias": corrected_bias(layer["bias"], wstates[role])}

  def aq(name, x):
    return act_fake_quant(x, astates[name], aspecs[name]) if acts_on else x

  return wq, aq


def act_exponent(state: dict, spec: ActSpec) -> chex.Array:
  """The integer exponent (int32 scalar) of a PoT activation quantizer."""
  if not spec.pot:
    raise ValueError("act_exponent needs a power-of-two activation quantizer")
  return pot.clip_exponent(jnp.round(state["exp"]))
