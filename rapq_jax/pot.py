"""Exact power-of-two (PoT) uniform quantizers.

Every scale is ``2**e`` with an integer exponent ``e`` (int32), so dequantization and
requantization are bit shifts. Conventions used throughout the library:

* Per-channel exponents index the **last** axis of a tensor (HWIO conv kernels and
  ``[in, out]`` dense kernels both keep output channels last); a scalar exponent is
  per-tensor.
* Signed symmetric integers lie in ``[-2**(b-1), 2**(b-1) - 1]`` with zero point 0;
  unsigned / asymmetric integers lie in ``[0, 2**b - 1]`` with an integer zero point.
* Exponents are saturated to ``[EXP_MIN, EXP_MAX]``; a tensor or channel that is all
  zeros gets exponent ``EXP_MIN`` instead of ``log2(0)``.

All functions are pure and jit-able. ``fake_quant`` passes gradients straight through
inside the representable range and blocks them outside it.
"""
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rapq_jax import power

MIN_BITS, MAX_BITS = 2, 8
EXP_MIN, EXP_MAX = -32, 31


def check_bits(bits) -> int:
  """Returns ``bits`` as int; raises ValueError unless it is an integer in [2, 8]."""
  if isinstance(bits, bool) or not isinstance(bits, (int, jnp.integer)) or not (
      MIN_BITS <= int(bits) <= MAX_BITS):
    raise ValueError(
        f"bit width {bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}")
  return int(bits)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
  """(qmin, qmax) of a ``bits``-bit integer: signed two's complement or unsigned."""
  bits = check_bits(bits)
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def clip_exponent(e: chex.Array) -> chex.Array:
  """Saturates integer exponents to [EXP_MIN, EXP_MAX] (int32)."""
  return jnp.clip(jnp.asarray(e), EXP_MIN, EXP_MAX).astype(jnp.int32)


def exp2(e: chex.Array) -> chex.Array:
  """Exact ``2.0**e`` (float32) for integer ``e``; no rounding error is possible."""
  return jnp.ldexp(jnp.float32(1.0), jnp.asarray(e, jnp.int32))


def round_ste(x: chex.Array) -> chex.Array:
  """Round half to even forward, identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def log2_exponents(scale: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array]:
  """Nearest (in the log domain), floor and ceil integer exponents of a real scale.

  Args:
    scale: float array (> 0 where meaningful), any shape.
  Returns:
    (nearest, floor, ceil), int32 arrays of ``scale``'s shape, saturated; a
    non-positive scale maps to EXP_MIN.
  """
  valid = scale > 0
  safe = jnp.where(valid, scale, 1.0)
  # floor / ceil from the binary exponent, exactly: XLA's float32 log2 is off by ~1e-6
  # at some exact powers of two (log2(2**13) < 13), which would move a floor or ceil.
  mantissa, exp = jnp.frexp(safe)          # safe = mantissa * 2**exp, mantissa in [0.5, 1)
  floor = exp - 1
  ceil = jnp.where(mantissa == 0.5, floor, exp)
  nearest = jnp.clip(jnp.round(jnp.log2(safe)), floor, ceil)

  def to_int(v):
    return clip_exponent(jnp.where(valid, v, EXP_MIN))

  return to_int(nearest), to_int(floor), to_int(ceil)


def _bcast(a: chex.Array, x: chex.Array) -> chex.Array:
  """Broadcasts a per-channel (last axis) or scalar array against ``x``."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  chex.assert_shape(a, (x.shape[-1],))
  return a


def zero_point_for(lo: chex.Array, e: chex.Array, bits: int) -> chex.Array:
  """Integer zero point (int32) in [0, 2**b - 1] that maps the real value ``lo`` <= 0
  to the integer grid of ``2**e``: ``clip(round(-lo / 2**e), 0, 2**b - 1)``."""
  _, qmax = int_range(bits, signed=False)
  return jnp.clip(jnp.round(-lo / exp2(e)), 0, qmax).astype(jnp.int32)


def quantize(x: chex.Array, e: chex.Array, bits: int, *, signed: bool,
             zero_point: chex.Array | int = 0) -> chex.Array:
  """Integer view: ``clip(round(x / 2**e) + zero_point, qmin, qmax)`` as int32.

  Args:
    x: float array, channels last.
    e: int32 exponent, scalar (per tensor) or ``[x.shape[-1]]`` (per channel).
    bits: 2..8.
    signed: signed symmetric range (zero point must be 0) or unsigned range.
    zero_point: int, scalar or per channel; only for unsigned.
  """
  qmin, qmax = int_range(bits, signed)
  scale = exp2(_bcast(e, x))
  q = jnp.round(x / scale) + _bcast(zero_point, x)
  return jnp.clip(q, qmin, qmax).astype(jnp.int32)


def dequantize(q: chex.Array, e: chex.Array, zero_point: chex.Array | int = 0) -> chex.Array:
  """Float view of integers: ``(q - zero_point) * 2**e`` (exact in float32)."""
  q = jnp.asarray(q)
  return (q - _bcast(zero_point, q)).astype(jnp.float32) * exp2(_bcast(e, q))


def fake_quant_scaled(x: chex.Array, scale: chex.Array, bits: int, *, signed: bool,
                      zero_point: chex.Array | int = 0) -> chex.Array:
  """Fake quantization on a given (possibly learnable) scale with straight-through
  rounding: the gradient w.r.t. ``x`` is 1 inside the range and 0 outside, and the
  gradient w.r.t. ``scale`` is the LSQ one. ``scale`` broadcasts like an exponent."""
  qmin, qmax = int_range(bits, signed)
  scale = _bcast(scale, x)
  zp = _bcast(zero_point, x).astype(x.dtype)
  # Bounded first: an x / scale that overflows to inf would make round_ste inf - inf = NaN
  # (anything beyond 2**24 saturates below anyway).
  q = round_ste(jnp.clip(x / scale, -2.0 ** 24, 2.0 ** 24)) + zp
  # Straight-through clip with gradient 1 on all of [qmin, qmax], ends included
  # (jnp.clip passes only 1/2 where q equals a bound).
  q = jnp.where(q < qmin, qmin, jnp.where(q > qmax, qmax, q))
  return (q - zp) * scale


def fake_quant(x: chex.Array, e: chex.Array, bits: int, *, signed: bool,
               zero_point: chex.Array | int = 0) -> chex.Array:
  """Float view of ``quantize``: equals ``dequantize(quantize(x, ...), e, zp)`` exactly;
  straight-through gradient for ``x`` inside the range, zero outside."""
  return fake_quant_scaled(x, exp2(_bcast(e, x)), bits, signed=signed, zero_point=zero_point)


class LpScale(NamedTuple):
  """Result of the Lp clipping search (all arrays per channel or scalar).

  scale: float32 real step size of the best clipping range.
  lo, hi: float32 best clipping range (``lo <= 0 <= hi``; ``lo == 0`` for signed /
    unsigned-only data).
  """
  scale: chex.Array
  lo: chex.Array
  hi: chex.Array


@functools.partial(jax.jit, static_argnames=("bits", "signed", "per_channel", "p",
                                             "num_candidates", "shrink"))
def lp_scale_search(x: chex.Array, bits: int, *, signed: bool, per_channel: bool,
                    p: float = 2.4, num_candidates: int = 80,
                    shrink: float = 0.01) -> LpScale:
  """BRECQ's scale initialisation: try clipping ranges ``[lo, hi] * (1 - i * shrink)``,
  ``i < num_candidates``, and keep the one with the least ``mean(|x - fq(x)|**p)``.

  Jitted, every argument but ``x`` static (a python ``p`` of 1 or 2 takes ``abs_pow``'s
  exact form): called outside a jit, its ``lax.map`` would be traced and compiled again
  on every call.

  Signed: symmetric range ``max(|lo|, |hi|)`` with ``2**(b-1)`` steps on each side.
  Unsigned: asymmetric range ``[min(x, 0), max(x, 0)]`` with ``2**b - 1`` steps and a
  real zero point (the integer one is recomputed for the chosen PoT exponent).

  Args:
    x: float array; channels last when ``per_channel``.
  Returns:
    LpScale with arrays of shape ``[x.shape[-1]]`` (per channel) or ``()``.
  """
  qmin, qmax = int_range(bits, signed)
  axes = tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))
  lo0 = jnp.minimum(jnp.min(x, axis=axes), 0.0)
  hi0 = jnp.maximum(jnp.max(x, axis=axes), 0.0)
  if signed:
    m = jnp.maximum(-lo0, hi0)
    lo0, hi0 = -m, m

  def candidate(i):
    f = 1.0 - i * shrink
    lo, hi = lo0 * f, hi0 * f
    if signed:
      scale = hi / (2 ** (bits - 1))
      zp = jnp.zeros_like(scale)
    else:
      scale = (hi - lo) / qmax
      zp = jnp.round(-lo / jnp.where(scale > 0, scale, 1.0))
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe) + zp, qmin, qmax)
    err = jnp.mean(power.abs_pow((q - zp) * safe - x, p), axis=axes)
    return err, scale, lo, hi

  # Sequential over candidates: a vmap would hold num_candidates copies of ``x``.
  errs, scales, los, his = jax.lax.map(candidate, jnp.arange(num_candidates, dtype=jnp.float32))
  best = jnp.argmin(errs, axis=0)
  pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)[0]
  return LpScale(pick(scales), pick(los), pick(his))

