"""Reconstruction objectives: an Lp output error whose exponent comes from the unit's
BatchNorm, and an optional BN-statistics term."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax.power import abs_pow


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


SEARCH_OBJECTIVES = ("kl", "mse", "ce")


def logits_disagreement(q_logits: chex.Array, fp_logits: chex.Array, kind: str) -> chex.Array:
  """Network-output objective for the exponent search (float32 scalar): ``'kl'`` =
  KL(fp || q) averaged over samples, ``'mse'`` = mean squared logit difference, ``'ce'``
  = cross-entropy of q against the FP model's top-1 class (a smooth stand-in for
  disagreeing with its predictions), averaged over samples."""
  return jnp.mean(sample_disagreement(q_logits, fp_logits, kind))


def sample_disagreement(q_logits: chex.Array, fp_logits: chex.Array, kind: str) -> chex.Array:
  """``logits_disagreement`` of each sample (float32 [N]; its mean is the objective)."""
  chex.assert_equal_shape([q_logits, fp_logits])
  if kind == "kl":
    lp = jax.nn.log_softmax(fp_logits)
    lq = jax.nn.log_softmax(q_logits)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  if kind == "mse":
    return jnp.mean((q_logits - fp_logits) ** 2, axis=-1)
  if kind == "ce":
    top = jnp.argmax(fp_logits, axis=-1)
    return -jnp.take_along_axis(jax.nn.log_softmax(q_logits), top[:, None], axis=-1)[:, 0]
  raise ValueError(f"unknown search objective {kind!r}; expected one of {SEARCH_OBJECTIVES}")
