"""Saving, loading and exporting a ``QuantizedModel``.

* orbax: ``save_model(qm, directory)`` / ``load_model(directory)``: the pytree's arrays
  (``arrays``) and its static structure as JSON (``structure``: units, bit widths,
  metadata), with the sha256 of each (``resume.save_checked``), verified on load; orbax
  commits the directory atomically.
* framework-neutral: ``save_npz(program, path)`` writes ``path.npz`` (the integer arrays
  of ``rapq_jax.integer.lower``: int8/uint8 weights, int32 zero points, biases,
  exponents and shifts, each a little-endian ``.npy`` member named like
  ``'layer1_0/conv1/q'``) and ``path.json`` (the manifest: op list of the layer graph,
  tensors with exponents and bit widths, rounding modes, the input quantizer and output
  dequantizer, every array's dtype and shape). ``rapq_jax.reference_reader`` runs it
  with numpy alone; docs/INTEGER.md describes the format.
* ONNX: ``to_onnx(program, input_shape)`` builds a QDQ graph (QuantizeLinear /
  DequantizeLinear around Conv and Gemm, every scale exactly ``2**e``, integer zero
  points); ``save_onnx`` writes it. Needs the ``onnx`` package (imported lazily).
"""
import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import integer, integrity, quantized, reference_reader, resume
from rapq_jax.units import ActPoint, Layer, Unit


# ------------------------------------------------------------------ orbax

def structure(qm: quantized.QuantizedModel) -> dict:
  """JSON-able static part of a model: units, bit widths, metadata."""
  return {"units": [dataclasses.asdict(u) for u in qm.units],
          "bits": [list(b) for b in qm.bits], "metadata": qm.metadata}


def units_from_json(units: list) -> tuple[Unit, ...]:
  """Inverse of ``dataclasses.asdict`` on units."""
  return tuple(Unit(**{**u, "layers": tuple(Layer(**l) for l in u["layers"]),
                       "acts": tuple(ActPoint(**a) for a in u["acts"])}) for u in units)


def save_model(qm: quantized.QuantizedModel, directory, *,
               extra: dict | None = None) -> pathlib.Path:
  """Orbax checkpoint of ``qm`` at ``directory`` (replaced if present), with ``extra``
  JSON-able facts (input shape, preprocessing...) beside the structure, and the sha256
  of both and of every array; returns it."""
  directory = pathlib.Path(directory).absolute()
  arrays = jax.tree.map(np.asarray, {"weights": qm.weights, "acts": qm.acts})
  st = {**structure(qm), "extra": json.loads(json.dumps(extra or {}))}
  resume.save_checked(directory, {"structure": st}, arrays)
  return directory


def _load_checked(directory) -> tuple[dict, dict]:
  """(structure, arrays) of a saved model, verified against its checksums."""
  documents, arrays = resume.load_checked(directory)
  if "structure" not in documents or arrays is None:
    raise integrity.IntegrityError(f"{directory}: not a model saved by save_model")
  return documents["structure"], arrays


def model_extra(directory) -> dict:
  """The ``extra`` facts saved with a model by ``save_model`` (checksums verified)."""
  return _load_checked(directory)[0].get("extra", {})


def load_model(directory) -> quantized.QuantizedModel:
  """The ``QuantizedModel`` saved by ``save_model`` (dtypes restored). Raises
  ``integrity.IntegrityError`` naming the directory if any byte of it was changed in a
  way that changes what is loaded."""
  st, arrays = _load_checked(directory)
  weights = {u: {r: {"q": jnp.asarray(w["q"]), "e": jnp.asarray(w["e"], jnp.int32),
                     "zp": jnp.asarray(w["zp"], jnp.int32),
                     "bias": jnp.asarray(w["bias"], jnp.float32)} for r, w in layers.items()}
             for u, layers in arrays["weights"].items()}
  acts = {u: {p: jnp.asarray(e, jnp.int32) for p, e in points.items()}
          for u, points in arrays.get("acts", {}).items()}
  units = units_from_json(st["units"])
  for unit in units:          # orbax drops empty dicts (the head has no act points)
    acts.setdefault(unit.name, {})
  return quantized.QuantizedModel(units, tuple(tuple(b) for b in st["bits"]), st["metadata"],
                                  weights, acts)


# ------------------------------------------------------------------ npz + manifest

def manifest_for_file(program: integer.Program, extra: dict | None = None) -> dict:
  """The program's manifest plus each array's dtype and shape (and ``extra`` facts), and
  ``checksums``: the sha256 of every array and of the rest of the manifest
  (``reference_reader.manifest_digest``)."""
  spec = json.loads(program.manifest)
  arrays = {k: np.asarray(v) for k, v in sorted(program.arrays.items())}
  spec["arrays"] = {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()}
  spec.update(extra or {})
  spec["checksums"] = {"arrays": integrity.digests(arrays),
                       "manifest": reference_reader.manifest_digest(spec)}
  return spec


def save_npz(program: integer.Program, path, *, extra: dict | None = None):
  """Writes ``path.npz`` and ``path.json`` atomically; returns both paths."""
  path = pathlib.Path(path)
  npz, manifest = path.with_suffix(".npz"), path.with_suffix(".json")
  arrays = {k: np.asarray(v) for k, v in program.arrays.items()}
  integrity.atomic_write(npz, lambda f: np.savez(f, **arrays))
  integrity.atomic_write(manifest, json.dumps(manifest_for_file(program, extra), indent=1,
                                              sort_keys=True))
  return npz, manifest


def load_npz(path) -> integer.Program:
  """The ``Program`` of an export written by ``save_npz`` (``path`` with or without
  suffix), read and checked by ``reference_reader.load``: checksums, and every array
  and op within the format's bounds (ValueError naming the file and what is wrong)."""
  spec, arrays = reference_reader.load(path)
  spec = {k: v for k, v in spec.items() if k in integer.MANIFEST_KEYS}
  return integer.Program(json.dumps(spec, sort_keys=True),
                         {k: jnp.asarray(v) for k, v in arrays.items()})


# ------------------------------------------------------------------ ONNX (QDQ)

ONNX_OPSET = 17


class _Onnx:
  """Builds the QDQ graph op by op; float values are exact multiples of ``2**exp``."""

  def __init__(self, program: integer.Program):
    import onnx  # pylint: disable=import-outside-toplevel
    self.onnx, self.helper = onnx, onnx.helper
    self.spec = program.spec
    self.a = {k: np.asarray(v) for k, v in program.arrays.items()}
    self.nodes, self.inits, self.names = [], [], set()
    self.env, self.hw = {}, {}

  def const(self, name, value) -> str:
    name = self.fresh(name)
    self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def fresh(self, name: str) -> str:
    base, i = name, 1
    while name in self.names:
      name, i = f"{base}_{i}", i + 1
    self.names.add(name)
    return name

  def node(self, op, inputs, name, **attrs) -> str:
    out = self.fresh(name)
    self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
    return out

  def exp(self, tensor):
    return self.a[self.spec["tensors"][tensor]["exp"]].astype(np.int64)

  @staticmethod
  def pow2(e):
    return np.ldexp(np.float32(1), np.asarray(e, np.int32)).astype(np.float32)

  def qdq(self, x, tensor, name) -> str:
    """Clip to the tensor's integer range, QuantizeLinear, DequantizeLinear."""
    info = self.spec["tensors"][tensor]
    e = int(self.a[info["exp"]])
    lo, hi = info["min"], info["max"]
    dtype = np.int8 if lo < 0 else np.uint8
    scale, zp = self.const(f"{name}_scale", self.pow2(e)), self.const(f"{name}_zp", dtype(0))
    x = self.node("Clip", [x, self.const(f"{name}_lo", self.pow2(e) * lo),
                           self.const(f"{name}_hi", self.pow2(e) * hi)], f"{name}_clip")
    q = self.node("QuantizeLinear", [x, scale, zp], f"{name}_q")
    return self.node("DequantizeLinear", [q, scale, zp], f"{name}_dq")

  def half_up(self, x, in_exp, shift, name, rank: int = 4) -> str:
    """Adds half a unit of the input grid where the requantization rounds (shift > 0):
    QuantizeLinear's round-half-to-even then rounds half up, exactly."""
    off = np.where(shift > 0, self.pow2(in_exp - 1), np.float32(0)).astype(np.float32)
    if not off.any():
      return x
    shape = (1, -1) + (1,) * (rank - 2) if off.ndim else ()
    return self.node("Add", [x, self.const(f"{name}_half", off.reshape(shape))], f"{name}_halfup")

  def weights(self, op, x_tensor, dense: bool):
    name = op["out"]
    q = self.a[op["weight"]]
    acc_e = self.a[f"{name}/acc_exp"].astype(np.int64)
    e_w = acc_e - self.exp(x_tensor)
    if dense:
      w, axis = q, 1                                   # [in, out]
    else:
      w, axis = np.ascontiguousarray(q.transpose(3, 2, 0, 1)), 0   # HWIO -> OIHW
    wq = self.node("DequantizeLinear", [
        self.const(f"{name}/q", w), self.const(f"{name}/w_scale", self.pow2(e_w)),
        self.const(f"{name}/w_zp", self.a[op["zero_point"]].astype(q.dtype))],
        f"{name}/w_dq", axis=axis)
    bq = self.node("DequantizeLinear", [
        self.const(f"{name}/bias", self.a[op["bias"]]),
        self.const(f"{name}/b_scale", self.pow2(acc_e)),
        self.const(f"{name}/b_zp", np.zeros(acc_e.shape, np.int32))], f"{name}/b_dq", axis=0)
    return wq, bq

  def build(self, input_shape):
    h, w, c = input_shape
    info = self.spec["input"]
    image = self.helper.make_tensor_value_info("image", self.onnx.TensorProto.FLOAT,
                                               ["N", h, w, c])
    x = self.node("Transpose", ["image"], "image_nchw", perm=[0, 3, 1, 2])
    self.env[info["tensor"]] = self.qdq(x, info["tensor"], "input")
    self.hw[info["tensor"]] = (h, w)
    for op in self.spec["ops"]:
      getattr(self, "op_" + op["op"])(op)
    out = self.spec["output"]["tensor"]
    logits = self.node("Identity", [self.env[out]], "logits")
    k = self.a[self.spec["output"]["exp"]].shape
    shape = ["N", *k] if self.spec["ops"][-1]["op"] == "dense" else ["N", "C", "H", "W"]
    outputs = [self.helper.make_tensor_value_info(logits, self.onnx.TensorProto.FLOAT, shape)]
    graph = self.helper.make_graph(self.nodes, "rapq_qdq", [image], outputs, self.inits)
    model = self.helper.make_model(
        graph, opset_imports=[self.helper.make_opsetid("", ONNX_OPSET)],
        producer_name="rapq_jax", doc_string=json.dumps(self.spec["metadata"]))
    model.ir_version = min(model.ir_version, 9)
    self.onnx.checker.check_model(model)
    return model

  def op_conv(self, op):
    wq, bq = self.weights(op, op["in"], dense=False)
    k, s, p = self.a[op["weight"]].shape[0], op["stride"], op["padding"]
    self.env[op["out"]] = self.node(
        "Conv", [self.env[op["in"]], wq, bq], op["out"], kernel_shape=[k, k], strides=[s, s],
        pads=[p] * 4, group=op["groups"])
    h, w = self.hw[op["in"]]
    self.hw[op["out"]] = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

  def op_dense(self, op):
    wq, bq = self.weights(op, op["in"], dense=True)
    self.env[op["out"]] = self.node("Gemm", [self.env[op["in"]], wq, bq], op["out"])

  def op_requantize(self, op):
    x = self.half_up(self.env[op["in"]], self.exp(op["in"]), self.a[op["shift"]], op["out"])
    self.env[op["out"]] = self.qdq(x, op["out"], op["out"])
    self.hw[op["out"]] = self.hw[op["in"]]

  def align(self, x, shift, e, name) -> str:
    """The shift rule onto the grid ``2**e`` [C] in float: ``floor(x / 2**e + 1/2) * 2**e``
    where ``shift > 0`` (exact; the identity on channels already on the grid)."""
    if not np.any(shift > 0):
      return x
    shape = (1, -1, 1, 1)
    x = self.node("Mul", [x, self.const(f"{name}_inv", self.pow2(-e).reshape(shape))], f"{name}_units")
    x = self.node("Add", [x, self.const(f"{name}_half", np.float32(0.5))], f"{name}_half")
    x = self.node("Floor", [x], f"{name}_floor")
    return self.node("Mul", [x, self.const(f"{name}_scale", self.pow2(e).reshape(shape))], f"{name}_aligned")

  def op_add(self, op):
    a, b = op["in"]
    e = self.exp(op["out"])
    xa = self.align(self.env[a], self.a[op["shift_a"]], e, f"{op['out']}_a")
    xb = self.align(self.env[b], self.a[op["shift_b"]], e, f"{op['out']}_b")
    self.env[op["out"]] = self.node("Add", [xa, xb], op["out"])
    self.hw[op["out"]] = self.hw[a]

  def op_subsample_pad(self, op):
    s = op["stride"]
    big = np.iinfo(np.int64).max
    x = self.node("Slice", [self.env[op["in"]], self.const("starts", np.array([0, 0])),
                            self.const("ends", np.array([big, big])),
                            self.const("axes", np.array([2, 3])),
                            self.const("steps", np.array([s, s]))], f"{op['out']}_slice")
    pads = np.array([0, op["pad_before"], 0, 0, 0, op["pad_after"], 0, 0], np.int64)
    self.env[op["out"]] = self.node("Pad", [x, self.const("pads", pads)], op["out"])
    h, w = self.hw[op["in"]]
    self.hw[op["out"]] = ((h - 1) // s + 1, (w - 1) // s + 1)

  def op_maxpool(self, op):
    k, s, p = op["window"], op["stride"], op["padding"]
    self.env[op["out"]] = self.node("MaxPool", [self.env[op["in"]]], op["out"],
                                    kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    h, w = self.hw[op["in"]]
    self.hw[op["out"]] = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)

  def op_avgpool(self, op):
    """GlobalAveragePool, then an offset below half a step of the mean's grid so that
    QuantizeLinear rounds half up: ``2**(e - log2 n - 1)`` for a power-of-two ``n > 1``,
    ``2**(e - ceil(log2 n) - 2)`` (< half of ``1 / n`` units, no ties exist) otherwise,
    none for ``n = 1``."""
    h, w = self.hw[op["in"]]
    n = h * w
    k = math.ceil(math.log2(n))
    e = int(self.exp(op["in"]))
    x = self.node("GlobalAveragePool", [self.env[op["in"]]], f"{op['out']}_mean")
    if n > 1:                                        # n = 1: the mean is already on the grid
      off = self.pow2(e - k - 1) if n == 2 ** k else self.pow2(e - k - 2)
      x = self.node("Add", [x, self.const(f"{op['out']}_half", off)], f"{op['out']}_halfup")
    x = self.qdq(x, op["out"], op["out"])
    self.env[op["out"]] = self.node("Flatten", [x], f"{op['out']}_flat", axis=1)


def to_onnx(program: integer.Program, input_shape):
  """ONNX QDQ model of a Program: float input ``image`` [N, H, W, C] (preprocessed,
  NHWC; ``input_shape = (H, W, C)``) -> ``logits`` [N, K]. Run in float it reproduces
  the integer path exactly (``checks.exact_float32``): every rounding is a
  QuantizeLinear (half to even) on a value offset by less than half a step."""
  return _Onnx(program).build(tuple(int(d) for d in input_shape))


def save_onnx(program: integer.Program, path, input_shape) -> pathlib.Path:
  """Writes ``to_onnx(program, input_shape)`` to ``path`` atomically."""
  path = pathlib.Path(path)
  data = to_onnx(program, input_shape).SerializeToString()
  integrity.atomic_write(path, data)
  return path
