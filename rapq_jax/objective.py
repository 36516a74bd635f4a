"""Reconstruction objectives: an Lp output error whose exponent comes from the unit's
BatchNorm, and an optional BN-statistics term."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def abs_pow(x: chex.Array, p) -> chex.Array:
  """``|x|**p`` (``p > 0``): every Lp error of the library (reconstruction losses, scale
  and grid choices). A python ``p`` of 1 or 2 is ``|x|`` or ``x * x``; any other ``p`` is
  computed as ``exp2(p * log2|x|)``, within about ``1e-7 |p log2|x||`` (relative) of
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


def bn_lp_exponent(gamma: chex.Array | None, *, coef: float = 0.1, digits: int | None = 1,
                   default: float = 2.0) -> float:
  """RAPQ's BN-derived Lp exponent ``p = round(1 + coef * sigmoid((sum(gamma) - 1) / C),
  digits)`` from the unit's last BN scale ``gamma`` [C] (python float).

  ``digits=None`` skips the rounding. A unit without BN (``gamma is None``) gets
  ``default``. With the official ``coef = 0.1, digits = 1`` the result is 1.0 or 1.1.
  """
  if gamma is None:
    return float(default)
  g = np.asarray(gamma, np.float64)
  p = 1.0 + coef / (1.0 + np.exp(-(g.sum() - 1.0) / g.size))
  return float(round(p, digits) if digits is not None else p)


def lp_loss(pred: chex.Array, target: chex.Array, p: float) -> chex.Array:
  """``|pred - target|**p`` summed over channels (last axis), averaged over the rest
  (BRECQ's reduction; float32 scalar)."""
  chex.assert_equal_shape([pred, target])
  return jnp.mean(jnp.sum(abs_pow(pred - target, p), axis=-1))


def bn_stats_loss(pre: dict, targets: dict) -> chex.Array:
  """Mean over layers and channels of ``(mean_c - beta)**2 + (var_c - gamma**2 var /
  (var + eps))**2``: the folded layer outputs' batch statistics against the BN running
  statistics. ``pre[role]`` are folded pre-activation outputs (channels last);
  ``targets[role] = {'mean', 'var'}``. Layers without targets are skipped."""
  terms = []
  for role, t in targets.items():
    if role not in pre:
      continue
    y = pre[role].reshape(-1, pre[role].shape[-1])
    mean, var = jnp.mean(y, axis=0), jnp.var(y, axis=0)
    terms.append(jnp.mean((mean - t["mean"]) ** 2 + (var - t["var"]) ** 2))
  return jnp.mean(jnp.stack(terms)) if terms else jnp.float32(0.0)


def logits_disagreement(q_logits: chex.Array, fp_logits: chex.Array, kind: str) -> chex.Array:
  """Network-output objective for the exponent search: ``'kl'`` = KL(fp || q) averaged
  over samples, ``'mse'`` = mean squared logit difference (float32 scalar)."""
  if kind == "kl":
    lp = jax.nn.log_softmax(fp_logits)
    lq = jax.nn.log_softmax(q_logits)
    return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))
  if kind == "mse":
    return jnp.mean((q_logits - fp_logits) ** 2)
  raise ValueError(f"unknown search objective {kind!r}; expected 'kl' or 'mse'")
