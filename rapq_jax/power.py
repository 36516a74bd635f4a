"""``|x|**p`` for float ``p`` without XLA's scalar ``pow``: every Lp error of the library
(reconstruction losses, scale and grid choices)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def abs_pow(x: chex.Array, p) -> chex.Array:
  """``|x|**p`` (``p > 0``). A python ``p`` of 1 or 2 is ``|x|`` or ``x * x``; any other
  ``p`` is computed as ``exp2(p * log2|x|)``, within about ``1e-7 |p log2|x||`` (relative) of
  ``pow``: XLA's CPU ``pow`` is a scalar library call, and a ResNet-20 unit's loss with
  p = 1.1 and its gradient took 6x as long with it. The derivative in ``x`` is
  ``p |x|**(p-1) sign(x)``, 0 at ``x = 0`` (pow's for ``p > 1``); in ``p`` it is
  ``|x|**p ln|x|``, 0 at ``x = 0``."""
  if isinstance(p, (int, float)) and p in (1, 2):
    return jnp.abs(x) if p == 1 else jnp.square(x)
  return _abs_pow(x, p)


def _abs_pow_parts(x, p):
  """(``|x|**p``, ``log2|x|`` (0 where ``x = 0``), ``x != 0``)."""
  a = jnp.abs(x)
  live = a > 0
  log_a = jnp.log2(jnp.where(live, a, 1.0))
  return jnp.where(live, jnp.exp2(p * log_a), 0.0).astype(a.dtype), log_a, live


@jax.custom_jvp
def _abs_pow(x: chex.Array, p) -> chex.Array:
  return _abs_pow_parts(x, p)[0]


def _abs_pow_jvp(primals, tangents):
  x, p = primals
  dx, dp = tangents
  y, log_a, live = _abs_pow_parts(x, p)
  out = jnp.zeros_like(y)
  if not isinstance(dx, SymbolicZero):
    slope = p * jnp.where(live, jnp.exp2((p - 1) * log_a), 0.0)
    out = out + (slope * jnp.sign(x) * dx).astype(y.dtype)
  if not isinstance(dp, SymbolicZero):
    out = out + (y * log_a * np.log(2.0) * dp).astype(y.dtype)
  return y, out


_abs_pow.defjvp(_abs_pow_jvp, symbolic_zeros=True)
