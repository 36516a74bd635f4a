"""The result of power-of-two PTQ: integer weights and integer exponents as a pytree.

``QuantizedModel`` leaves:

* ``weights[unit][role]``: ``q`` (kernel-shaped 8-bit container: int8 when signed,
  uint8 when unsigned with zero point), ``e`` (int32 [O], scale ``2**e``), ``zp``
  (int32 [O]), ``bias`` (float32 [O]).
* ``acts[unit][point]``: int32 scalar exponent (scale ``2**e``, zero point 0).

Static fields: the network structure (``units``), each quantizer's bit width and
signedness (``bits``: ``((key, bits, signed), ...)`` with key ``'unit/role'`` or
``'unit/@point'``), and ``metadata`` (a JSON string: config, seed, versions).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp

from rapq_jax import pot, quantizers
from rapq_jax.network import Network, Unit, network_apply


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedModel:
  units: tuple[Unit, ...] = dataclasses.field(metadata=dict(static=True))
  bits: tuple = dataclasses.field(metadata=dict(static=True))
  metadata: str = dataclasses.field(metadata=dict(static=True))
  weights: dict
  acts: dict

  def bit_table(self) -> dict:
    return {k: (b, s) for k, b, s in self.bits}

  @property
  def info(self) -> dict:
    return json.loads(self.metadata)


def from_states(net: Network, states: dict, specs: dict, metadata: dict) -> QuantizedModel:
  """Integers and exponents from hard PoT quantizer states (see ``rapq_jax.ptq``)."""
  weights, acts, bits = {}, {}, []
  for unit in net.units:
    wspecs, aspecs = specs[unit.name]
    weights[unit.name], acts[unit.name] = {}, {}
    for layer in unit.layers:
      spec = wspecs[layer.role]
      q, e, zp = quantizers.weight_integers(
          net.params[unit.name][layer.role]["kernel"], states[unit.name]["w"][layer.role], spec)
      weights[unit.name][layer.role] = {"q": q, "e": e, "zp": zp,
                                        "bias": net.params[unit.name][layer.role]["bias"]}
      bits.append((f"{unit.name}/{layer.role}", spec.bits, spec.signed))
    for point, spec in aspecs.items():
      acts[unit.name][point] = quantizers.act_exponent(states[unit.name]["a"][point], spec)
      bits.append((f"{unit.name}/@{point}", spec.bits, spec.signed))
  return QuantizedModel(net.units, tuple(bits), json.dumps(metadata, sort_keys=True),
                        weights, acts)


def dequantized_params(qm: QuantizedModel) -> dict:
  """Float kernels ``(q - zp) * 2**e`` and biases, shaped like ``Network.params``."""
  return {u: {r: {"kernel": pot.dequantize(w["q"].astype(jnp.int32), w["e"], w["zp"]),
                  "bias": w["bias"]} for r, w in layers.items()}
          for u, layers in qm.weights.items()}


def apply(qm: QuantizedModel, x):
  """Fake-quant inference: float32 NHWC input -> float32 logits. Every weight is an
  integer times ``2**e`` and every quantized activation an integer times ``2**e``."""
  table = qm.bit_table()
  params = dequantized_params(qm)
  net = Network(qm.units, params, {})

  def aq_for(u):
    def aq(point, h):
      b, signed = table[f"{u}/@{point}"]
      return pot.fake_quant(h, qm.acts[u][point], b, signed=signed)
    return aq

  return network_apply(net, x, None, aq_for)


def check_power_of_two(qm: QuantizedModel) -> None:
  """Raises AssertionError unless every exponent is an int32 in [EXP_MIN, EXP_MAX] and
  every integer weight lies in its quantizer's range."""
  table = qm.bit_table()
  for u, layers in qm.weights.items():
    for r, w in layers.items():
      b, signed = table[f"{u}/{r}"]
      qmin, qmax = pot.int_range(b, signed)
      q = jnp.asarray(w["q"], jnp.int32)
      assert w["e"].dtype == jnp.int32, f"{u}/{r}: exponent dtype {w['e'].dtype}"
      assert bool(jnp.all((w["e"] >= pot.EXP_MIN) & (w["e"] <= pot.EXP_MAX))), f"{u}/{r}"
      assert bool(jnp.all((q >= qmin) & (q <= qmax))), f"{u}/{r}: integers out of range"
      assert bool(jnp.all((w["zp"] >= 0) & (w["zp"] <= max(qmax, 0)))), f"{u}/{r}: zero point"
  for u, points in qm.acts.items():
    for p, e in points.items():
      assert e.dtype == jnp.int32, f"{u}/@{p}: exponent dtype {e.dtype}"
