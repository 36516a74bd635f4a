"""Rectified-sigmoid relaxation of a binary rounding choice (AdaRound), used for both
the rounding of every weight and the floor/ceil choice of every PoT exponent (RAPQ).

``h(v) = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``, with ``zeta = 1.1`` and
``gamma = -0.1``; the hard choice is ``v >= 0``. The regulariser
``sum(1 - |2 h(v) - 1| ** b)`` pushes every ``h`` to 0 or 1 as ``b`` anneals.
"""
import chex
import jax
import jax.numpy as jnp

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: chex.Array) -> chex.Array:
  """Soft choice in [0, 1], float, same shape as ``v``."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_choice(v: chex.Array) -> chex.Array:
  """The hardened choice: 1 where ``h(v) >= 0.5`` (``v >= 0``), else 0 (float)."""
  return (v >= 0).astype(jnp.float32)


def init_logits(fraction: chex.Array) -> chex.Array:
  """Logits ``v`` with ``h(v) == fraction`` for fractions in (0, 1), so that the soft
  relaxation starts exactly at the unquantized value."""
  frac = jnp.clip(fraction, 1e-4, 1.0 - 1e-4)
  return -jnp.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def regularizer(v: chex.Array, b: chex.Array) -> chex.Array:
  """``sum(1 - |2 h(v) - 1| ** b)`` (float scalar): zero only when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** b)


def warmup_steps(num_steps: int, warmup: float) -> int:
  """The steps before the regulariser starts: the first ``warmup`` fraction of
  ``num_steps`` (python int)."""
  return int(warmup * num_steps)


def linear(count: chex.Array, steps: chex.Array, start: float, end: float) -> chex.Array:
  """``start`` at ``count = 0`` to ``end`` at ``count >= steps`` (> 0), linearly (float32
  scalar); ``steps`` may be traced. The same arithmetic as ``optax.linear_schedule``,
  whose step count must be a python int."""
  count = jnp.clip(count, 0, steps)
  return (start - end) * (1 - count / steps) + end


def temperature(step: chex.Array, num_steps: chex.Array, warm: chex.Array, *,
                start_b: float = 20.0, end_b: float = 2.0) -> chex.Array:
  """AdaRound's ``b`` at ``step`` of ``num_steps`` (float32 scalar): ``start_b`` for the
  first ``warm`` steps (``warmup_steps``; the regulariser is off there, see
  ``regularizer_active``), then linear down to ``end_b``. The counts may be traced, so one
  compiled step serves every budget."""
  return jnp.where(step < warm, start_b,
                   linear(step - warm, jnp.maximum(num_steps - warm, 1), start_b, end_b))


def lr_scale(ref_iters: int, num_steps) -> chex.Array:
  """The factor on the rounding logits' learning rate (float32 scalar):
  ``ref_iters / num_steps`` for a stage shorter than ``ref_iters`` steps (and
  ``ref_iters`` not 0), else 1, so that a short stage moves the logits as far as one of
  ``ref_iters`` steps. ``num_steps`` may be traced or a python int."""
  if not ref_iters:
    return jnp.float32(1.0)
  return jnp.maximum(1.0, ref_iters / jnp.maximum(num_steps, 1)).astype(jnp.float32)


def regularizer_active(step: chex.Array, warm: chex.Array) -> chex.Array:
  """1.0 once ``step`` is past the ``warm`` warm-up steps, else 0.0 (float scalar)."""
  return (step >= warm).astype(jnp.float32)
