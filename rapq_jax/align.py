"""Function-preserving channel rescaling that puts float-optimal scales on powers of two.

A ReLU is positively homogeneous: ``relu(g * z) = g * relu(z)`` for ``g > 0``. Where a
layer's output reaches the next layer only through a ReLU (inside a ResNet basic block or
bottleneck: ``conv1 -> relu1 -> conv2``), multiplying the producer's output channel ``c``
(kernel column and bias) by ``g_c`` and the consumer's input channel ``c`` by ``1 / g_c``
leaves the FP network's function unchanged. Power-of-two quantization is not invariant
to it, and the factors are chosen so that a scale the float methods would use lands
exactly on a power of two:

* ``'weights'``: per producer channel, ``g_c = 2**round(log2 s_c) / s_c`` where ``s_c`` is
  the channel's Lp-optimal weight scale (``pot.lp_scale_search``, the initialisation of
  every method); the producer's PoT grid is then the float grid, ``g_c`` in
  ``[2**-0.5, 2**0.5]``. The ReLU's per-tensor activation grid sees channel ``c`` scaled
  by ``g_c``, and the consumer's per-channel weight scales move a little.
* ``'acts'``: one ``g`` per ReLU point, ``2**round(log2 a) / a`` for the Lp-optimal
  per-tensor scale ``a`` of the FP activation on calibration images: the activation grid
  is the float one; the weight grids of both layers move by ``g``.

Only ReLU points inside a unit qualify (ReLU6 is not homogeneous; a unit's output feeds a
residual sum). The rescaled network is what gets quantized and deployed; it computes
the same function in FP (up to float rounding).
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp

from rapq_jax import pot
from rapq_jax.config import ALIGN_MODES
from rapq_jax.network import Network, unit_apply
from rapq_jax.units import Unit, activation


def _to_pot(scale: chex.Array) -> chex.Array:
  """``2**round(log2 scale) / scale`` (1 where ``scale`` is not positive)."""
  nearest = pot.log2_exponents(scale)[0]
  return jnp.where(scale > 0, pot.exp2(nearest) / jnp.where(scale > 0, scale, 1.0), 1.0)


def rescale_link(net: Network, unit: str, producer: str, consumer: str,
                 g: chex.Array) -> Network:
  """``net`` with ``unit``'s ``producer`` output channels multiplied by ``g`` [C] (kernel,
  bias and BN targets: mean by ``g``, variance by ``g**2``, gamma by ``g``) and the
  matching input channels of ``consumer`` divided by it (grouped consumers included)."""
  u = next(x for x in net.units if x.name == unit)
  params = dict(net.params[unit])
  prod, cons = params[producer], params[consumer]
  chex.assert_shape(g, (prod["kernel"].shape[-1],))
  params[producer] = {"kernel": prod["kernel"] * g, "bias": prod["bias"] * g}
  kernel = cons["kernel"]
  groups = u.layer(consumer).groups
  per_group_in, out = kernel.shape[-2], kernel.shape[-1]
  # Input channel of kernel[..., i, o]: (o's group) * per_group_in + i.
  group_of_out = jnp.arange(out) // (out // groups)
  channel = group_of_out[None, :] * per_group_in + jnp.arange(per_group_in)[:, None]
  params[consumer] = {"kernel": kernel / g[channel], "bias": cons["bias"]}
  targets = dict(net.bn_targets[unit])
  if producer in targets:
    t = targets[producer]
    targets[producer] = {**t, "mean": t["mean"] * g, "var": t["var"] * g * g,
                         "gamma": t["gamma"] * g}
  return dataclasses.replace(net, params={**net.params, unit: params},
                             bn_targets={**net.bn_targets, unit: targets})


def align(net: Network, mode: str, *, wbits: int, abits: int, weight_signed: bool,
          p: float, calib: chex.Array | None = None) -> tuple[Network, dict]:
  """The rescaled network and ``{'unit/point': g}`` ([C] factors).

  Args:
    net: a folded network.
    mode: one of ``ALIGN_MODES`` (``'none'`` returns ``net``).
    wbits / abits: the bit widths of the rescaled layers and ReLU points.
    weight_signed: the weight quantizers' range (``PTQConfig.weight_signed``).
    p: the Lp exponent of the scale searches (``PTQConfig.scale_p``).
    calib: float32 NHWC calibration images (``'acts'`` only: the factors come from the
      FP activations of these).
  """
  if mode not in ALIGN_MODES:
    raise ValueError(f"align_scales = {mode!r}: expected one of {ALIGN_MODES}")
  if mode == "acts" and calib is None:
    raise ValueError("align_scales = 'acts' needs calibration images")
  factors = {}
  if mode == "none":
    return net, factors
  x = calib
  for unit in net.units:
    for producer, point, consumer in unit.rescalable_links:
      if mode == "weights":
        lp = pot.lp_scale_search(net.params[unit.name][producer]["kernel"], wbits,
                                 signed=weight_signed, per_channel=True, p=p)
        g = _to_pot(lp.scale)
      else:
        h = activation(unit.activation, _fp_pre(unit, net.params[unit.name], x)[producer])
        lp = pot.lp_scale_search(h, abits, signed=False, per_channel=False, p=p)
        g = jnp.full(h.shape[-1:], _to_pot(lp.scale))
      net = rescale_link(net, unit.name, producer, consumer, g)
      factors[f"{unit.name}/{point}"] = g
    if mode == "acts":
      x = _fp_out(unit, net.params[unit.name], x)
  return net, factors


@functools.partial(jax.jit, static_argnums=0)
def _fp_pre(unit: Unit, params: dict, x: chex.Array) -> dict:
  return unit_apply(unit, params, x)[1]


@functools.partial(jax.jit, static_argnums=0)
def _fp_out(unit: Unit, params: dict, x: chex.Array) -> chex.Array:
  return unit_apply(unit, params, x)[0]
