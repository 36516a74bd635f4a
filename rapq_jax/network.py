"""A BN-folded network as a sequence of reconstruction units, with a pure forward pass.

A ``Network`` is static structure (``units``: which layers each unit has, how they are
wired, where activations are quantized; ``rapq_jax.units``) plus pytrees of arrays:

* ``params[unit][layer] = {'kernel': HWIO or [in, out] float32, 'bias': [out] float32}``
  (BatchNorm already folded in),
* ``bn_targets[unit][layer] = {'mean': [out], 'var': [out], 'gamma': [out]}``: the statistics a
  folded layer's output should have (BN ``beta`` and ``gamma**2 * var / (var + eps)``)
  and the BN scale, for layers that had a BatchNorm.

Quantization is injected through two callables so that the same forward serves the FP
network, fake-quant reconstruction and the final quantized model:
``wq(role, {'kernel', 'bias'}) -> {'kernel', 'bias'}`` (the float layer parameters ->
those it computes with) and ``aq(point, x) -> x``.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rapq_jax import units
from rapq_jax.units import Unit

WeightHook = Callable[[str, dict], dict]
ActHook = Callable[[str, jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Network:
  units: tuple[Unit, ...] = dataclasses.field(metadata=dict(static=True))
  params: dict
  bn_targets: dict


def identity_hook(_, x):
  return x


def unit_apply(unit: Unit, params: dict, x, wq: WeightHook = identity_hook,
               aq: ActHook = identity_hook):
  """Forward of one unit: its program (``Unit.program``) interpreted in float32.

  Args:
    unit: static structure.
    params: ``{role: {'kernel', 'bias'}}`` of this unit.
    x: float32 NHWC input (the head pools it itself).
  Returns:
    (y, pre): the unit output and ``{role: folded layer output before activation}``.
  """
  pre = {}
  values = {"x": x}
  for op in unit.program:
    a = [values[name] for name in op.inputs]
    if op.op == "linear":
      layer = wq(op.role, params[op.role])
      y = units.layer_apply(unit.layer(op.role), layer["kernel"], layer["bias"], a[0])
      pre[op.role] = y
    elif op.op == "quant":
      y = aq(op.point, a[0])
    elif op.op == "avgpool":
      y = jnp.mean(a[0], axis=(1, 2))
    elif op.op == "add":
      y = a[0] + a[1]
    else:
      y = units.wiring_op(unit, op, a)
    values[op.out] = y
  return y, pre


def network_apply(net: Network, x, wq_for=None, aq_for=None, *, until: int | None = None):
  """Forward through ``net.units[:until]``.

  ``wq_for(unit_name) -> WeightHook`` and ``aq_for(unit_name) -> ActHook`` give the
  hooks of each unit (identity when None). Returns the last unit's output.
  """
  for unit in net.units[:until]:
    wq = wq_for(unit.name) if wq_for else identity_hook
    aq = aq_for(unit.name) if aq_for else identity_hook
    x, _ = unit_apply(unit, net.params[unit.name], x, wq, aq)
  return x
