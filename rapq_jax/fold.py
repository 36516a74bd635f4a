"""BatchNorm folding (``rapq_jax.adapter`` reads a model's units and folds each BN).

Folding a BN (scale ``g``, bias ``beta``, running ``mu``, ``v``) into the conv before it:
``w' = w * g / sqrt(v + eps)`` (per output channel, last axis) and
``b' = beta + (b - mu) * g / sqrt(v + eps)``. The folded output should then have per
channel mean ``beta`` and variance ``g**2 * v / (v + eps)``: kept as the BN targets.
"""
import jax.numpy as jnp

BN_EPS = 1e-5


def fold_bn(kernel, bias, bn_params, bn_stats, eps: float = BN_EPS):
  """Folds one BatchNorm into the preceding layer.

  Args:
    kernel: HWIO or [in, out] float; output channels last.
    bias: [out] or None.
    bn_params: {'scale', 'bias'}; bn_stats: {'mean', 'var'}, each [out].
  Returns:
    (kernel', bias', {'mean', 'var', 'gamma'}) with the folded output's BN targets.
  """
  g, beta = jnp.asarray(bn_params["scale"]), jnp.asarray(bn_params["bias"])
  mu, var = jnp.asarray(bn_stats["mean"]), jnp.asarray(bn_stats["var"])
  inv = g / jnp.sqrt(var + eps)
  b = jnp.zeros_like(mu) if bias is None else jnp.asarray(bias)
  targets = {"mean": beta, "var": g ** 2 * var / (var + eps), "gamma": g}
  return jnp.asarray(kernel) * inv, beta + (b - mu) * inv, targets


def subtree(tree, path):
  """``tree[k0][k1]...`` along ``path``: a sequence of keys or a '/'-separated string."""
  for part in path.split("/") if isinstance(path, str) else path:
    tree = tree[part]
  return tree
