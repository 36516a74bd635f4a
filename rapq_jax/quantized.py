"""The result of power-of-two PTQ: integer weights and integer exponents as a pytree,
and its inference simulated in float32 with exactly the integer hardware's arithmetic.

``QuantizedModel`` leaves:

* ``weights[unit][role]``: ``q`` (kernel-shaped 8-bit container: int8 when signed,
  uint8 when unsigned with zero point), ``e`` (int32 [O], scale ``2**e``), ``zp``
  (int32 [O]), ``bias`` (float32 [O]; inference rounds it onto the accumulator grid,
  see ``accumulator_exponents``).
* ``acts[unit][point]``: int32 scalar exponent (scale ``2**e``, zero point 0).

Static fields: the network structure (``units``), each quantizer's bit width and
signedness (``bits``: ``((key, bits, signed), ...)`` with key ``'unit/role'`` or
``'unit/@point'``), and ``metadata`` (a JSON string: config, seed, versions).

Arithmetic of ``apply`` (the same as ``rapq_jax.integer``, written with floats):

* The network input is quantized at the first unit's ``'input'`` point, rounding half
  to even (``pot.fake_quant``): the input quantizer.
* A layer's accumulator has exponent ``e_w[c] + e_in`` (``accumulator_exponents``); its
  bias is rounded (half to even) onto that grid, so every pre-activation value is an
  exact integer multiple of a power of two (float32 holds it exactly below 2**23 units).
* Every other activation point rounds half up, ``floor(x / 2**e + 1/2)``, then clamps
  to its integer range (ReLU is the clamp at 0; ReLU6 commutes with the rounding).
* A residual sum is formed per channel at ``max(min(e_a, e_b), e_out - 8)``
  (``residual_exponents``): the coarser operand is shifted left, one finer than the
  floor is first rounded half up onto it.
* The head's global average pool rounds the mean of the integers half up onto the
  input's own grid: ``floor((sum + n // 2) / n)`` (``n = H * W``).
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import fake_quant, pot, units
from rapq_jax.units import Unit

ADD_GUARD_BITS = 8


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


def from_states(net, states: dict, specs: dict, metadata: dict) -> QuantizedModel:
  """Integers and exponents of a folded ``network.Network`` from its hard PoT quantizer
  states (see ``rapq_jax.ptq``)."""
  weights, acts = _integers(net, states, fake_quant.spec_items(specs))
  bits = []
  for unit in net.units:
    wspecs, aspecs = specs[unit.name]
    bits += [(f"{unit.name}/{layer.role}", wspecs[layer.role].bits, wspecs[layer.role].signed)
             for layer in unit.layers]
    bits += [(f"{unit.name}/@{point}", spec.bits, spec.signed) for point, spec in aspecs.items()]
  return QuantizedModel(net.units, tuple(bits), json.dumps(metadata, sort_keys=True),
                        weights, acts)


@functools.partial(jax.jit, static_argnames="spec_items")
def _integers(net, states: dict, spec_items: tuple) -> tuple[dict, dict]:
  """``(weights, acts)`` of ``QuantizedModel`` from the states, as one compiled program
  (op by op, its small integer conversions cost seconds on a ResNet)."""
  specs = fake_quant.specs_of(spec_items)
  weights, acts = {}, {}
  for unit in net.units:
    wspecs, aspecs = specs[unit.name]
    weights[unit.name] = {}
    for layer in unit.layers:
      q, e, zp = fake_quant.weight_integers(
          net.params[unit.name][layer.role]["kernel"], states[unit.name]["w"][layer.role],
          wspecs[layer.role])
      bias = fake_quant.corrected_bias(net.params[unit.name][layer.role]["bias"],
                                       states[unit.name]["w"][layer.role])
      weights[unit.name][layer.role] = {"q": q, "e": e, "zp": zp, "bias": bias}
    acts[unit.name] = {point: fake_quant.act_exponent(states[unit.name]["a"][point], spec)
                       for point, spec in aspecs.items()}
  return weights, acts


def input_exponents(qm: QuantizedModel) -> dict:
  """``{unit: {role: int32 scalar}}``: the exponent of each layer's (per-tensor) input."""
  out, prev = {}, None
  for unit in qm.units:
    acts = qm.acts[unit.name]
    out[unit.name] = {}
    for role, point in units.layer_inputs(unit).items():
      e = prev if point is None else acts[point]
      if e is None:
        raise ValueError(f"unit {unit.name!r}: layer {role!r} has no quantized input (the "
                         "first unit must have an 'input' activation point)")
      out[unit.name][role] = jnp.asarray(e, jnp.int32)
    prev = acts.get("out", prev)
  return out


def live_channels(w: dict):
  """bool [O]: output channels with a nonzero integer weight ``q - zp``."""
  d = jnp.asarray(w["q"], jnp.int32) - w["zp"]
  return jnp.any(d != 0, axis=tuple(range(d.ndim - 1)))


def accumulator_exponents(qm: QuantizedModel) -> dict:
  """``{unit: {role: int32 [O]}}``: exponent of each layer's int32 accumulator,
  ``e_w[c] + e_in``. A channel whose integers are all zero has no product terms, only
  its bias; it takes the least exponent of the layer's live channels (``e_in`` if none)
  instead of its own (``EXP_MIN`` for an all-zero kernel channel), keeping the bias
  integer small."""
  ein = input_exponents(qm)
  out = {}
  for u, layers in qm.weights.items():
    out[u] = {}
    for r, w in layers.items():
      e = w["e"] + ein[u][r]
      live = live_channels(w)
      dead = jnp.where(jnp.any(live), jnp.min(jnp.where(live, e, jnp.iinfo(jnp.int32).max)),
                       ein[u][r])
      out[u][r] = jnp.where(live, e, dead).astype(jnp.int32)
  return out


def grid_bias(bias, acc_e):
  """The bias rounded half to even onto the accumulator grid ``2**acc_e`` (float32)."""
  scale = pot.exp2(acc_e)
  return jnp.round(bias / scale) * scale


def residual_exponents(e_a, e_b, e_out):
  """int32 [C]: the exponent a residual sum is formed at, per channel:
  ``max(min(e_a, e_b), e_out - ADD_GUARD_BITS)``. The coarser operand is shifted left
  onto it (exact); an operand finer than ``e_out - ADD_GUARD_BITS`` is first rounded
  half up onto it, which keeps sums of very differently scaled operands small."""
  return jnp.maximum(jnp.minimum(e_a, e_b), e_out - ADD_GUARD_BITS).astype(jnp.int32)


def align_sim(x, e):
  """Float view of the shift rule onto the grid ``2**e`` (per channel): values on a
  coarser grid are unchanged, finer ones round half up, ``floor(x / 2**e + 1/2)``."""
  scale = pot.exp2(e)
  return jnp.floor(x / scale + 0.5) * scale


def requant_sim(x, e, bits: int, signed: bool):
  """Float view of hardware requantization: ``clip(floor(x / 2**e + 1/2)) * 2**e``
  (round half up), exact for values on a finer power-of-two grid below 2**23 units."""
  qmin, qmax = pot.int_range(bits, signed)
  return jnp.clip(align_sim(x, e) / pot.exp2(e), qmin, qmax) * pot.exp2(e)


def pool_sim(x, e):
  """Float view of the integer global average pool: ``[N, H, W, C]`` values on the grid
  ``2**e`` -> ``[N, C]`` means rounded half up onto the same grid."""
  n = x.shape[1] * x.shape[2]
  scale = pot.exp2(e)
  total = jnp.sum(x / scale, axis=(1, 2))                 # exact integers
  return jnp.floor_divide(total + n // 2, n) * scale


def _unit_sim(unit: Unit, params: dict, acc_e: dict, acts: dict, aq, x, e_x):
  """One unit's simulated forward: its program (``Unit.program``) with the integer
  path's arithmetic; ``x`` is the unit input on the grid ``2**e_x``. Each value's
  exponent is tracked (per channel after a layer: its accumulator's) so that a residual
  sum aligns its operands as the integer path does."""
  values, exps = {"x": x}, {"x": e_x}
  for op in unit.program:
    a = [values[name] for name in op.inputs]
    e = exps[op.inputs[0]]
    if op.op == "linear":
      y = units.layer_apply(unit.layer(op.role), params[op.role]["kernel"],
                            params[op.role]["bias"], a[0])
      e = acc_e[op.role]
    elif op.op == "quant":
      y, e = aq(op.point, a[0]), acts[op.point]
    elif op.op == "avgpool":
      y = pool_sim(a[0], e)
    elif op.op == "add":
      e = residual_exponents(e, exps[op.inputs[1]], acts[op.point])
      y = align_sim(a[0], e) + align_sim(a[1], e)
    else:
      y = units.wiring_op(unit, op, a)       # keeps the grid of its input
    values[op.out], exps[op.out] = y, e
  return y


@jax.jit
def apply(qm: QuantizedModel, x):
  """Inference simulated in float32: float32 NHWC input -> float32 logits ``[N, K]``
  (jitted: one program per model structure and input shape, not one per operation).
  Every weight, bias and activation is an integer times a power of two and every
  rounding is the integer path's (``rapq_jax.integer``), so the logits equal its
  dequantized ones exactly while intermediate integers stay below 2**23 (the
  ``checks.exact_float32`` of ``integer.lower``)."""
  return unit_outputs(qm, x)[-1]


def unit_outputs(qm: QuantizedModel, x, cached: tuple | None = None, start=None) -> tuple:
  """The output of every unit of ``apply`` (the last: the logits).

  With ``cached`` (the outputs of an earlier call) and ``start`` (an int32 scalar, may be
  traced), the units before ``start`` are not computed: their outputs are read from
  ``cached`` (``jax.lax.cond``, so the skipped units cost nothing). ``cached`` must come
  from a model equal to ``qm`` in those units, whose outputs depend on nothing after
  them: that is how the exponent search scores a move of unit ``start`` without the
  units before it."""
  table = qm.bit_table()
  acc_e = accumulator_exponents(qm)
  params = {u: {r: {"kernel": pot.dequantize(w["q"].astype(jnp.int32), w["e"], w["zp"]),
                    "bias": grid_bias(w["bias"], acc_e[u][r])} for r, w in layers.items()}
            for u, layers in qm.weights.items()}

  def aq_for(u):
    def aq(point, h):
      b, signed = table[f"{u}/@{point}"]
      if point == "input":
        return pot.fake_quant(h, qm.acts[u][point], b, signed=signed)
      return requant_sim(h, qm.acts[u][point], b, signed)
    return aq

  e_x, outs = None, []
  with jax.default_matmul_precision("float32"):   # no TF32/bf16 passes on accelerators
    for i, unit in enumerate(qm.units):
      acts = qm.acts[unit.name]
      run = functools.partial(_unit_sim, unit, params[unit.name], acc_e[unit.name], acts,
                              aq_for(unit.name), x, e_x)
      x = run() if cached is None else jax.lax.cond(i < start, lambda i=i: cached[i], run)
      outs.append(x)
      e_x = acts.get("out", e_x)
  return tuple(outs)


def _require(ok, message: str) -> None:
  """Raises AssertionError(message) unless ``ok`` (unlike ``assert``, also under -O)."""
  if not bool(ok):
    raise AssertionError(message)


def check_power_of_two(qm: QuantizedModel) -> None:
  """Raises AssertionError unless every exponent (weight channels and activations) is an
  int32 in [EXP_MIN, EXP_MAX], so every scale is exactly ``2**e``, and every weight is an
  integer in its quantizer's range with an integer zero point in range. The checks are
  explicit raises, not ``assert`` statements, so they also hold under ``python -O``."""
  table = qm.bit_table()
  in_range = lambda e: np.all((e >= pot.EXP_MIN) & (e <= pot.EXP_MAX))
  for u, layers in qm.weights.items():
    for r, w in layers.items():
      b, signed = table[f"{u}/{r}"]
      qmin, qmax = pot.int_range(b, signed)
      e, q, zp = (np.asarray(w[k]) for k in ("e", "q", "zp"))   # dtypes as stored
      _require(e.dtype == np.int32, f"{u}/{r}: exponent dtype {e.dtype}")
      _require(in_range(e), f"{u}/{r}: exponents outside [{pot.EXP_MIN}, {pot.EXP_MAX}]")
      _require(np.issubdtype(q.dtype, np.integer), f"{u}/{r}: weight dtype {q.dtype}")
      _require(np.all((q >= qmin) & (q <= qmax)), f"{u}/{r}: integers out of range")
      _require(np.issubdtype(zp.dtype, np.integer), f"{u}/{r}: zero point dtype {zp.dtype}")
      _require(np.all((zp >= 0) & (zp <= max(qmax, 0))), f"{u}/{r}: zero point")
  for u, points in qm.acts.items():
    for p, e in points.items():
      e = np.asarray(e)
      _require(e.dtype == np.int32, f"{u}/@{p}: exponent dtype {e.dtype}")
      _require(in_range(e), f"{u}/@{p}: exponent outside [{pot.EXP_MIN}, {pot.EXP_MAX}]")
