"""Integer-only inference of a ``QuantizedModel``.

``lower(qm)`` lowers the model to a ``Program``: a static op list (``manifest``, a
JSON string) over named integer arrays (``arrays``). ``run`` executes it with integer
arithmetic only, from the quantized input to the int32 output accumulator; floats
appear only in ``quantize_input`` (the input quantizer) and ``dequantize_output``.

Numbers (every tensor is an integer array times ``2**exp``):

* activations: int32 holding the point's integers (unsigned ``[0, 2**b - 1]``, signed
  ``[-2**(b-1), 2**(b-1) - 1]``), a per-tensor exponent;
* weights: the model's 8-bit containers ``q`` (int8 / uint8) with an int32 zero point
  per output channel; the product term is ``q - zp``;
* accumulators: int32, exponent ``e_w[c] + e_in`` per output channel
  (``quantized.accumulator_exponents``); the bias is an int32 on that grid.

Ops (``manifest['ops']``, in order; ``in`` / ``out`` name tensors, other strings name
arrays):

* ``conv``: NHWC input, HWIO ``q``, stride, symmetric zero padding, groups:
  ``sum x * (q - zp) + bias`` in int32.
* ``dense``: ``[N, C] @ (q - zp)[C, O] + bias`` in int32.
* ``requantize``: ``shift`` int32 [C] (``e_out - e_in`` per channel), the shift rule
  ``shift_round``: ``s > 0: (v + (1 << (s - 1))) >> s`` (arithmetic shift: round half
  up), ``s <= 0: v << -s``; then clamp to ``[min, max]``. ReLU is ``min = 0``; ReLU6 is
  ``max = floor(6 / 2**e_out + 1/2)`` (clamping commutes with the rounding).
* ``add``: residual sum ``shift_round(a, shift_a) + shift_round(b, shift_b)`` at the
  exponent ``max(min(e_a, e_b), e_out - 8)`` per channel
  (``quantized.residual_exponents``): the coarser operand shifts left (exact), an
  operand finer than ``e_out - 8`` rounds half up onto it.
* ``subsample_pad``: ``x[:, ::2, ::2, :]`` zero-padded on channels (CIFAR option A).
* ``maxpool``: 3x3, stride 2, padding 1 (padding never wins), on requantized integers.
* ``avgpool``: global over ``n = H * W``: ``floor((sum + n // 2) / n)`` (round half up),
  computed as ``(sum + (n >> 1)) >> log2(n)`` when ``n`` is a power of two.

``lower`` bounds every intermediate value from the integer ranges and raises
ValueError where int32 could overflow or a shift exceeds 30 bits; the manifest's
``checks`` record the largest bound and whether all stay below 2**23, in which case
``rapq_jax.quantized.apply`` (the float32 simulation) equals ``apply`` here exactly
(the average pool's sum, ``n * 255`` at most, adds the condition ``H * W <= 32768``).
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import pot, quantized, units
from rapq_jax.units import Unit

FORMAT = "rapq-integer"
VERSION = 1
INT32_LIMIT = 2 ** 31
MAX_SHIFT = 30
EXACT_FLOAT_LIMIT = 2 ** 23
MANIFEST_KEYS = ("format", "version", "input", "output", "rounding", "ops", "tensors", "checks",
                 "units", "metadata")
ROUNDING = {
    "input": "half_to_even: clamp(rint(x / 2**exp)) (float input quantizer)",
    "bias": "half_to_even onto the accumulator grid (offline)",
    "requantize": "half_up: s > 0: (v + (1 << (s - 1))) >> s; s <= 0: v << -s; then clamp",
    "add": "each operand by the requantize shift rule onto max(min(e_a, e_b), e_out - 8)",
    "avgpool": "half_up: floor((sum + n // 2) / n), n = H * W",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Program:
  """Integer inference program: ``manifest`` (static JSON: ops, tensors, input and
  output description, rounding, checks) and ``arrays`` (``{name: integer ndarray}``)."""
  manifest: str = dataclasses.field(metadata=dict(static=True))
  arrays: dict

  @property
  def spec(self) -> dict:
    return _parse(self.manifest)


@functools.lru_cache(maxsize=32)
def _parse(manifest: str) -> dict:
  return json.loads(manifest)


# ------------------------------------------------------------------ lower

class _Builder:
  """Accumulates ops, arrays, exponents and magnitude bounds (numpy, host side)."""

  def __init__(self, qm: quantized.QuantizedModel):
    self.qm = qm
    self.table = qm.bit_table()
    # Jitted: op by op these small integer ops took seconds on a ResNet-18.
    self.acc_e = jax.tree.map(np.asarray, jax.jit(quantized.accumulator_exponents)(qm))
    self.ops, self.arrays, self.tensors = [], {}, {}
    self.bound, self.exp = {}, {}      # tensor -> int64 [C] or scalar; int64 [C] or scalar
    self.channels = {}                 # tensor -> channel count, where known
    self.max_bound = 0

  def _check(self, where: str, bound, *, value: bool = True) -> None:
    """Refuses a bound beyond int32; ``value`` bounds (not the rounding addend's
    transient ``v + 2**(s-1)``) also decide ``checks.exact_float32``."""
    worst = int(np.max(bound))
    if value:
      self.max_bound = max(self.max_bound, worst)
    if worst >= INT32_LIMIT:
      raise ValueError(f"{where}: values may reach {worst}, beyond int32")

  def _tensor(self, name, exp_key, bound, **info):
    self.tensors[name] = {"exp": exp_key, **info}
    self.bound[name] = np.asarray(bound, np.int64)
    self.exp[name] = np.asarray(self.arrays[exp_key], np.int64)
    return name

  def act_input(self, unit: Unit, point: str) -> str:
    e = np.asarray(self.qm.acts[unit.name][point], np.int32)
    bits, signed = self.table[f"{unit.name}/@{point}"]
    qmin, qmax = pot.int_range(bits, signed)
    key = f"{unit.name}/@{point}"
    self.arrays[f"{key}/exp"] = e
    return self._tensor(key, f"{key}/exp", max(-qmin, qmax), bits=bits, signed=signed,
                        min=qmin, max=qmax)

  def linear(self, unit: Unit, role: str, x: str) -> str:
    layer = unit.layer(role)
    w = self.qm.weights[unit.name][role]
    name = f"{unit.name}/{role}"
    if np.ndim(self.bound[x]) != 0:
      raise ValueError(f"{name}: input {x!r} is not a per-tensor quantized activation")
    q, zp = np.asarray(w["q"]), np.asarray(w["zp"], np.int32)
    acc_e = self.acc_e[unit.name][role].astype(np.int32)
    scaled = np.asarray(w["bias"], np.float32) / np.ldexp(np.float32(1), acc_e)
    bias = np.round(scaled.astype(np.float64))
    if np.any(np.abs(bias) >= INT32_LIMIT):
      raise ValueError(f"{name}: bias does not fit int32 on the accumulator grid")
    self.arrays.update({f"{name}/q": q, f"{name}/zp": zp, f"{name}/bias": bias.astype(np.int32),
                        f"{name}/acc_exp": acc_e})
    terms = np.abs(q.astype(np.int64) - zp).reshape(-1, q.shape[-1]).sum(0)
    bound = terms * self.bound[x] + np.abs(bias).astype(np.int64)
    self._check(name, bound)
    op = {"op": "dense" if layer.dense else "conv", "in": x, "out": name,
          "weight": f"{name}/q", "zero_point": f"{name}/zp", "bias": f"{name}/bias",
          "weight_bits": self.table[name][0]}
    if not layer.dense:
      op.update(stride=layer.stride, padding=q.shape[0] // 2, groups=layer.groups)
    self.ops.append(op)
    return self._tensor(name, f"{name}/acc_exp", bound)

  def requantize(self, unit: Unit, point: str, v: str, *, activation: str | None) -> str:
    e = int(self.qm.acts[unit.name][point])
    bits, signed = self.table[f"{unit.name}/@{point}"]
    lo, hi = pot.int_range(bits, signed)
    if activation is not None:
      lo = max(lo, 0)
      if activation == "relu6":
        hi = min(hi, int(np.floor(6.0 * 2.0 ** -e + 0.5)))
    channels = self.exp[v].shape[-1] if np.ndim(self.exp[v]) else None
    shift = np.broadcast_to(e - self.exp[v], (channels,) if channels else ()).astype(np.int32)
    key = f"{unit.name}/@{point}"
    self._shift_bound(f"{key} (requantize from {v})", self.bound[v], shift)
    self.arrays.update({f"{key}/exp": np.int32(e), f"{key}/shift": np.atleast_1d(shift)})
    self.ops.append({"op": "requantize", "in": v, "out": key, "shift": f"{key}/shift",
                     "min": lo, "max": hi})
    return self._tensor(key, f"{key}/exp", max(-lo, hi), bits=bits, signed=signed, min=lo,
                        max=hi)

  def _shift_bound(self, where: str, bound, shift):
    """Bound after the shift rule (``s > 0`` rounding right shift, else left shift)."""
    shift = np.asarray(shift, np.int64)
    if np.any(np.abs(shift) > MAX_SHIFT):
      raise ValueError(f"{where}: shift {int(np.max(np.abs(shift)))} exceeds {MAX_SHIFT} bits")
    right = np.maximum(shift, 0)
    self._check(where, bound + np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0),
                value=False)
    out = np.where(shift > 0, (bound >> right) + 1, bound << np.maximum(-shift, 0))
    self._check(where, out)
    return out

  def add(self, unit: Unit, a: str, b: str, point: str) -> str:
    """The residual sum ``a + b``, aligned for its requantization at ``point``."""
    name = f"{unit.name}/add"
    e_out = np.asarray(self.qm.acts[unit.name][point])
    e = np.asarray(quantized.residual_exponents(self.exp[a], self.exp[b], e_out), np.int64)
    sa = np.broadcast_to(e - self.exp[a], e.shape).astype(np.int32)
    sb = np.broadcast_to(e - self.exp[b], e.shape).astype(np.int32)
    bound = self._shift_bound(name, self.bound[a], sa) + self._shift_bound(name, self.bound[b], sb)
    self._check(name, bound)
    self.arrays.update({f"{name}/shift_a": sa, f"{name}/shift_b": sb,
                        f"{name}/exp": e.astype(np.int32)})
    self.ops.append({"op": "add", "in": [a, b], "out": name, "shift_a": f"{name}/shift_a",
                     "shift_b": f"{name}/shift_b"})
    return self._tensor(name, f"{name}/exp", bound)

  def passthrough(self, unit: Unit, op: dict, x: str, suffix: str) -> str:
    """An op that keeps the exponent and bound of its input."""
    name = f"{unit.name}/{suffix}"
    self.ops.append({**op, "in": x, "out": name})
    self.tensors[name] = {k: v for k, v in self.tensors[x].items()}
    self.bound[name], self.exp[name] = self.bound[x], self.exp[x]
    return name

  def unit(self, unit: Unit, x: str | None) -> str:
    """Lowers one unit's program (``Unit.program``); ``x`` is the previous unit's output
    tensor (None before the first unit). An ``'act'`` becomes the clamp of the
    requantization that follows it (ReLU: ``min = 0``; ReLU6: also ``max``)."""
    values = {"x": x}
    activated = set()          # values holding an activation still to be clamped
    for op in _requantize_before_pool(unit.program):
      a = [values[name] for name in op.inputs]
      if op.op != "quant" and any(v is None for v in a):
        raise ValueError(f"unit {unit.name!r} has no quantized input")
      pending = any(name in activated for name in op.inputs)
      if op.op == "quant":
        if op.point == "input":
          y = self.act_input(unit, op.point)
        else:
          y = self.requantize(unit, op.point, a[0],
                              activation=unit.activation if pending else None)
        pending = False
      elif op.op == "act":
        y = a[0]
        pending = True
      elif op.op == "maxpool":      # commutes with the clamp: an activation stays pending
        y = self.passthrough(unit, {"op": "maxpool", "window": 3, "stride": 2, "padding": 1},
                             a[0], "maxpool")
      elif pending:
        raise ValueError(f"unit {unit.name!r}: op {op.op!r} reads an activation that no "
                         "quantizer clamps")
      elif op.op == "linear":
        y = self.linear(unit, op.role, a[0])
      elif op.op == "avgpool":
        y = self.passthrough(unit, {"op": "avgpool"}, a[0], "avgpool")
      elif op.op == "subsample_pad":
        cin, cout = self.channels[a[0]], self.channels[a[1]]
        pad = (cout - cin) // 2
        y = self.passthrough(unit, {"op": "subsample_pad", "stride": 2, "pad_before": pad,
                                    "pad_after": cout - cin - pad}, a[0], "option_a")
      elif op.op == "add":
        y = self.add(unit, a[0], a[1], op.point)
      else:
        raise ValueError(f"unit {unit.name!r}: unknown op {op.op!r}")
      values[op.out] = y
      if pending:
        activated.add(op.out)
      self.channels[y] = (self.qm.weights[unit.name][op.role]["q"].shape[-1]
                          if op.op == "linear" else self.channels.get(a[0]))
    return y


def _requantize_before_pool(program: tuple[units.Op, ...]) -> list[units.Op]:
  """``program`` with each ``maxpool -> quant`` pair swapped: max pooling commutes with
  the (monotone) requantization and its clamp, so the integers are the same, and it
  pools the narrow requantized integers instead of the int32 accumulator."""
  ops = list(program)
  for i in range(len(ops) - 1):
    pool, quant = ops[i], ops[i + 1]
    if pool.op == "maxpool" and quant.op == "quant" and quant.inputs == (pool.out,):
      ops[i] = quant._replace(inputs=pool.inputs, out=f"{quant.out}:unpooled")
      ops[i + 1] = pool._replace(inputs=(ops[i].out,), out=quant.out)
  return ops


def lower(qm: quantized.QuantizedModel) -> Program:
  """Lowers a ``QuantizedModel`` (concrete arrays, not traced) to an integer Program.

  Raises:
    ValueError: where an intermediate could overflow int32 or a shift exceeds 30 bits.
  """
  b = _Builder(qm)
  x = None
  for unit in qm.units:
    x = b.unit(unit, x)
  first = qm.units[0].name
  manifest = {
      "format": FORMAT, "version": VERSION,
      "input": {"tensor": f"{first}/@input", "layout": "NHWC", "dtype": "float32",
                **b.tensors[f"{first}/@input"]},
      "output": {"tensor": x, "exp": b.tensors[x]["exp"], "layout": "[N, K]"},
      "rounding": ROUNDING,
      "ops": b.ops,
      "tensors": b.tensors,
      "checks": {"max_abs_bound": b.max_bound,
                 "exact_float32": b.max_bound < EXACT_FLOAT_LIMIT},
      "units": [dataclasses.asdict(u) for u in qm.units],
      "metadata": qm.info,
  }
  arrays = {k: jnp.asarray(v) for k, v in b.arrays.items()}
  return Program(json.dumps(manifest, sort_keys=True), arrays)


# ------------------------------------------------------------------ run

def shift_round(v, shift):
  """The shift rule: int32 ``v``, int32 ``shift`` (broadcast on the last axis) ->
  ``(v + (1 << (s - 1))) >> s`` for ``s > 0`` (round half up), ``v << -s`` otherwise."""
  r = jnp.maximum(shift, 0)
  half = jnp.where(r > 0, jnp.left_shift(jnp.int32(1), jnp.maximum(r - 1, 0)), 0)
  return jnp.where(shift > 0, jnp.right_shift(v + half, r), jnp.left_shift(v, jnp.maximum(-shift, 0)))


def requantize(v, shift, lo: int, hi: int):
  """int32 ``v`` -> ``clamp(shift_round(v, shift), lo, hi)``."""
  return jnp.clip(shift_round(v, shift), lo, hi)


def avgpool(x):
  """Global average pool of int32 ``[N, H, W, C]`` -> ``[N, C]``, round half up."""
  n = x.shape[1] * x.shape[2]
  total = jnp.sum(x, axis=(1, 2), dtype=jnp.int32)
  if n & (n - 1) == 0:
    return jnp.right_shift(total + (n >> 1), n.bit_length() - 1)
  return jnp.floor_divide(total + n // 2, n)


def _weights(op, arrays):
  return arrays[op["weight"]].astype(jnp.int32) - arrays[op["zero_point"]]


def _op(op: dict, arrays: dict, *xs):
  kind = op["op"]
  if kind == "conv":
    p = op["padding"]
    y = jax.lax.conv_general_dilated(
        xs[0], _weights(op, arrays), (op["stride"],) * 2, [(p, p)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=op["groups"],
        preferred_element_type=jnp.int32)
    return y + arrays[op["bias"]]
  if kind == "dense":
    return jnp.matmul(xs[0], _weights(op, arrays), preferred_element_type=jnp.int32) + \
        arrays[op["bias"]]
  if kind == "requantize":
    return requantize(xs[0], arrays[op["shift"]], op["min"], op["max"])
  if kind == "add":
    return shift_round(xs[0], arrays[op["shift_a"]]) + shift_round(xs[1], arrays[op["shift_b"]])
  if kind == "subsample_pad":
    s = op["stride"]
    return jnp.pad(xs[0][:, ::s, ::s, :], ((0, 0),) * 3 + ((op["pad_before"], op["pad_after"]),))
  if kind == "maxpool":
    w, s, p = op["window"], op["stride"], op["padding"]
    return jax.lax.reduce_window(xs[0], jnp.iinfo(jnp.int32).min, jax.lax.max, (1, w, w, 1),
                                 (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0)))
  if kind == "avgpool":
    return avgpool(xs[0])
  raise ValueError(f"unknown op {kind!r}")


def run(program: Program, x_int):
  """Integer forward: int32 NHWC input integers -> the output tensor's int32 integers
  (``[N, K]`` accumulators for a classifier). Integer ops only; jit-able."""
  spec = program.spec
  env = {spec["input"]["tensor"]: jnp.asarray(x_int, jnp.int32)}
  for op in spec["ops"]:
    ins = op["in"] if isinstance(op["in"], list) else [op["in"]]
    env[op["out"]] = _op(op, program.arrays, *(env[i] for i in ins))
  return env[spec["output"]["tensor"]]


def quantize_input(program: Program, x):
  """The input quantizer: float32 NHWC image -> int32 integers (round half to even)."""
  info = program.spec["input"]
  e = program.arrays[info["exp"]]
  return pot.quantize(x, e, info["bits"], signed=info["signed"])


def dequantize_output(program: Program, acc):
  """int32 output integers -> float32 ``acc * 2**exp`` (exp per class)."""
  return acc.astype(jnp.float32) * pot.exp2(program.arrays[program.spec["output"]["exp"]])


@jax.jit
def apply(program: Program, x):
  """Float32 NHWC image -> float32 logits through the integer path (jitted: one program
  per manifest and input shape, not one per operation)."""
  return dequantize_output(program, run(program, quantize_input(program, x)))
