"""Reference reader of the integer export (``rapq_jax.export.save_npz``), plain numpy.

No JAX: this module imports only ``hashlib``/``json``/``pathlib`` (through
``rapq_jax.integrity``) and ``numpy``, and is meant as the executable specification a C
port follows op by op (docs/INTEGER.md). Arithmetic is int64 with every op's result
checked to fit int32, so results equal an int32 implementation's
(``rapq_jax.integer.lower`` guarantees no int32 overflow).

``load`` refuses a file that is not exactly what was written (sha256 of every array and
of the manifest) or that lies outside the format's bounds (``check``): a ValueError names
the file, the array or op and the bound.

  python -m rapq_jax.reference_reader model.json images.npy   # float32 NHWC, preprocessed
"""
import json
import pathlib
import sys

import numpy as np

from rapq_jax import integrity

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
FORMAT = "rapq-integer"
# Bounds of the format (docs/INTEGER.md): activation and weight exponents lie in
# [EXP_MIN, EXP_MAX]; accumulator and residual-sum exponents, sums of two of those, in
# [2 * EXP_MIN, 2 * EXP_MAX]; every shift in [-MAX_SHIFT, MAX_SHIFT]; bit widths in
# [MIN_BITS, MAX_BITS].
EXP_MIN, EXP_MAX = -32, 31
MAX_SHIFT = 30
MIN_BITS, MAX_BITS = 2, 8
# op -> its integer fields (with their least value) and array fields.
OPS = {
    "conv": ({"stride": 1, "padding": 0, "groups": 1, "weight_bits": MIN_BITS},
             ("weight", "zero_point", "bias")),
    "dense": ({"weight_bits": MIN_BITS}, ("weight", "zero_point", "bias")),
    "requantize": ({"min": INT32_MIN, "max": INT32_MIN}, ("shift",)),
    "add": ({}, ("shift_a", "shift_b")),
    "subsample_pad": ({"stride": 1, "pad_before": 0, "pad_after": 0}, ()),
    "maxpool": ({"window": 1, "stride": 1, "padding": 0}, ()),
    "avgpool": ({}, ()),
}


def manifest_digest(manifest: dict) -> str:
  """sha256 of the manifest without its ``checksums`` entry (canonical JSON)."""
  return integrity.json_digest({k: v for k, v in manifest.items() if k != "checksums"})


def load(path) -> tuple[dict, dict]:
  """(manifest, {name: ndarray}) of ``path.json`` / ``path.npz``, verified against the
  manifest's checksums and checked by ``check``. ValueError (``IntegrityError`` for
  damage) names the file and what is wrong."""
  path = pathlib.Path(path)
  jpath, npath = path.with_suffix(".json"), path.with_suffix(".npz")
  try:
    manifest = json.loads(jpath.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise integrity.IntegrityError(f"{jpath}: not valid JSON ({err})") from None
  except OSError as err:
    raise ValueError(f"{jpath}: cannot be read ({err})") from None
  if not isinstance(manifest, dict):
    raise integrity.IntegrityError(f"{jpath}: expected a JSON object (the manifest); got "
                     f"{type(manifest).__name__}")
  try:
    with np.load(npath, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except FileNotFoundError as err:
    raise ValueError(f"{npath}: cannot be read ({err})") from None
  except Exception as err:  # pylint: disable=broad-except  (a damaged zip raises anything)
    raise integrity.IntegrityError(f"{npath}: cannot be read ({type(err).__name__}: {err}); "
                                   "the file is damaged") from None
  check(manifest, arrays, str(jpath))
  return manifest, arrays


def _fail(where: str, what: str):
  raise ValueError(f"{where}: {what}")


def _int(where: str, value, least: int, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    _fail(where, f"{what} = {value!r}: expected an integer >= {least}")
  return value


def _within(where: str, name: str, a, lo: int, hi: int, what: str) -> None:
  """ValueError naming the array ``name`` unless all its values lie in ``[lo, hi]``."""
  a = np.asarray(a)
  if a.size and (a.min() < lo or a.max() > hi):
    bad = a.min() if a.min() < lo else a.max()
    _fail(where, f"array {name!r} holds {int(bad)}, outside the {what} bound [{lo}, {hi}]")


def _array(where: str, arrays: dict, name, *, rank=None, dtypes=None):
  if not isinstance(name, str) or name not in arrays:
    _fail(where, f"array {name!r} is missing from the npz")
  a = arrays[name]
  if rank is not None and a.ndim not in ((rank,) if isinstance(rank, int) else rank):
    _fail(where, f"array {name!r} has shape {a.shape}; expected rank {rank}")
  if dtypes is not None and a.dtype.name not in dtypes:
    _fail(where, f"array {name!r} has dtype {a.dtype}; expected one of {dtypes}")
  return a


def _weight_range(bits: int, signed: bool) -> tuple[int, int]:
  return (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _check_exp(where, manifest, arrays, tensor: str, acc: bool):
  info = manifest["tensors"].get(tensor) if isinstance(tensor, str) else None
  if not isinstance(info, dict):
    _fail(where, f"tensor {tensor!r} is not described in 'tensors'")
  e = _array(where, arrays, info.get("exp"), rank=(0, 1), dtypes=("int32",))
  lo, hi = (2 * EXP_MIN, 2 * EXP_MAX) if acc else (EXP_MIN, EXP_MAX)
  _within(where, info["exp"], e, lo, hi, "accumulator exponent" if acc else "exponent")
  return info, e


def _check_act(where, manifest, arrays, tensor: str, lo: int, hi: int) -> None:
  """An activation tensor: per-tensor exponent, bits, and [lo, hi] inside its range."""
  info, e = _check_exp(where, manifest, arrays, tensor, acc=False)
  bits = _int(where, info.get("bits"), MIN_BITS, f"tensor {tensor!r} bits")
  if bits > MAX_BITS or e.ndim:
    _fail(where, f"tensor {tensor!r}: {bits} bits / exponent shape {e.shape}; expected "
          f"{MIN_BITS}..{MAX_BITS} bits and a scalar exponent")
  qmin, qmax = _weight_range(bits, bool(info.get("signed")))
  if not qmin <= lo <= hi <= qmax:
    _fail(where, f"tensor {tensor!r}: range [{lo}, {hi}] outside its {bits}-bit range "
          f"[{qmin}, {qmax}]")


def check(manifest: dict, arrays: dict, where: str = "manifest") -> None:
  """Raises ValueError naming ``where`` and the array, op or field unless the export is
  the one written (checksums) and within the format's bounds: known ops with integer
  fields, arrays of the right dtype and rank, weights within their bit width, zero
  points within the weight range, exponents and shifts within the bounds above."""
  sums = manifest.get("checksums")
  if not isinstance(sums, dict) or manifest_digest(manifest) != sums.get("manifest"):
    raise integrity.IntegrityError(f"{where}: checksum mismatch of the manifest (or no "
                                   "'checksums' entry): the file is damaged")
  integrity.verify(arrays, sums.get("arrays"), where.replace(".json", ".npz"))
  for key in ("format", "input", "output", "ops", "tensors", "arrays"):
    if key not in manifest:
      _fail(where, f"manifest entry {key!r} is missing")
  if manifest["format"] != FORMAT:
    _fail(where, f"format {manifest['format']!r}; expected {FORMAT!r}")
  for key in ("input", "output", "tensors", "arrays"):
    if not isinstance(manifest[key], dict):
      _fail(where, f"manifest entry {key!r} must be an object")
  for name, info in manifest["arrays"].items():
    if (name not in arrays or arrays[name].dtype.str != info.get("dtype")
        or list(arrays[name].shape) != info.get("shape")):
      _fail(where, f"array {name!r} does not match its manifest entry {info}")
  inp = manifest["input"]
  if not isinstance(manifest["ops"], list):
    _fail(where, "manifest entry 'ops' must be a list")
  _check_act(where, manifest, arrays, inp.get("tensor"), _int(where, inp.get("min"), INT32_MIN,
                                                              "input min"),
             _int(where, inp.get("max"), INT32_MIN, "input max"))
  defined = {inp["tensor"]}
  for i, op in enumerate(manifest["ops"]):
    kind = op.get("op") if isinstance(op, dict) else None
    if kind not in OPS:
      _fail(where, f"op {i}: unknown op {kind!r}; known: {', '.join(OPS)}")
    at = f"{where}: op {i} ({kind} -> {op.get('out')!r})"
    ins = op.get("in") if kind == "add" else [op.get("in")]
    if not isinstance(ins, list) or len(ins) != (2 if kind == "add" else 1) or not all(
        isinstance(t, str) and t in defined for t in ins):
      _fail(at, f"input {op.get('in')!r} is not a tensor computed before it")
    fields, array_fields = OPS[kind]
    for field, least in fields.items():
      _int(at, op.get(field), least, field)
    for field in array_fields:
      _array(at, arrays, op.get(field))
    _check_op(at, kind, op, arrays, manifest)
    if not isinstance(op.get("out"), str):
      _fail(at, f"output {op.get('out')!r} is not a tensor name")
    defined.add(op["out"])
  out = manifest["output"]
  if not isinstance(out.get("tensor"), str) or out["tensor"] not in defined:
    _fail(where, f"output tensor {out!r} is computed by no op")
  _check_exp(where, manifest, arrays, out["tensor"], acc=True)


def _check_op(at: str, kind: str, op: dict, arrays: dict, manifest: dict) -> None:
  """Arrays and bounds of one op (its integer fields are checked by the caller)."""
  if kind in ("conv", "dense"):
    q = _array(at, arrays, op.get("weight"), rank=4 if kind == "conv" else 2,
               dtypes=("int8", "uint8"))
    out_ch = q.shape[-1]
    bits, signed = op["weight_bits"], q.dtype == np.int8
    if bits > MAX_BITS:
      _fail(at, f"weight_bits = {bits}: expected {MIN_BITS}..{MAX_BITS}")
    lo, hi = _weight_range(bits, signed)
    _within(at, op["weight"], q, lo, hi, f"{bits}-bit weight")
    zp = _array(at, arrays, op.get("zero_point"), rank=1, dtypes=("int32",))
    _within(at, op["zero_point"], zp, 0, max(hi, 0), f"{bits}-bit zero point")
    bias = _array(at, arrays, op.get("bias"), rank=1, dtypes=("int32",))
    if zp.shape != (out_ch,) or bias.shape != (out_ch,):
      _fail(at, f"zero point {zp.shape} / bias {bias.shape}; expected ({out_ch},) each")
    _, e = _check_exp(at, manifest, arrays, op.get("out"), acc=True)
    if e.shape != (out_ch,):
      _fail(at, f"accumulator exponent shape {e.shape}; expected ({out_ch},)")
    if kind == "conv" and (q.shape[0] != q.shape[1] or out_ch % op["groups"]):
      _fail(at, f"weight shape {q.shape}: expected a square kernel and {op['groups']} "
            "groups dividing the output channels")
  elif kind == "requantize":
    shift = _array(at, arrays, op.get("shift"), rank=1, dtypes=("int32",))
    _within(at, op["shift"], shift, -MAX_SHIFT, MAX_SHIFT, "shift")
    _check_act(at, manifest, arrays, op.get("out"), op["min"], op["max"])
  elif kind == "add":
    for key in ("shift_a", "shift_b"):
      shift = _array(at, arrays, op.get(key), rank=1, dtypes=("int32",))
      _within(at, op[key], shift, -MAX_SHIFT, MAX_SHIFT, "shift")
    _check_exp(at, manifest, arrays, op.get("out"), acc=True)
  elif kind == "maxpool" and op["padding"] >= op["window"]:
    _fail(at, f"padding {op['padding']} must be smaller than the window {op['window']}")


def _int32(v, where: str):
  if v.size and (v.min() < INT32_MIN or v.max() > INT32_MAX):
    raise OverflowError(f"{where}: value outside int32")
  return v


def _pow2(e):
  return np.ldexp(np.float32(1), np.asarray(e, np.int32)).astype(np.float32)


def conv(x, w, stride: int, padding: int, groups: int):
  """int64 NHWC ``x``, HWIO ``w`` -> int64 NHWC; zero padding, PyTorch-style groups."""
  kh, kw, cg, out = w.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
  win = win[:, ::stride, ::stride]                      # [N, Ho, Wo, C, kh, kw]
  if groups == 1:
    return np.tensordot(win, w.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))
  og = out // groups
  if cg == 1 and og == 1:                               # depthwise
    return np.einsum("nhwcij,ijc->nhwc", win, w[:, :, 0, :])
  parts = [np.tensordot(win[..., g * cg:(g + 1) * cg, :, :],
                        w[..., g * og:(g + 1) * og].transpose(2, 0, 1, 3),
                        axes=([3, 4, 5], [0, 1, 2])) for g in range(groups)]
  return np.concatenate(parts, axis=-1)


def shift_round(v, shift):
  """``s > 0: (v + (1 << (s - 1))) >> s`` (round half up); ``s <= 0: v << -s``."""
  shift = shift.astype(np.int64)
  r, l = np.maximum(shift, 0), np.maximum(-shift, 0)
  half = np.where(r > 0, np.left_shift(np.int64(1), np.maximum(r - 1, 0)), 0)
  return np.where(shift > 0, (v + half) >> r, v << l)


def requantize(v, shift, lo: int, hi: int):
  """``clamp(shift_round(v, shift), lo, hi)``."""
  return np.clip(shift_round(v, shift), lo, hi)


def avgpool(x):
  """Global average pool, round half up: ``floor((sum + n // 2) / n)``, ``n = H * W``."""
  n = x.shape[1] * x.shape[2]
  return (x.sum(axis=(1, 2)) + n // 2) // n


def maxpool(x, window: int, stride: int, padding: int):
  p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = np.pad(x, p, constant_values=np.iinfo(np.int64).min)
  win = np.lib.stride_tricks.sliding_window_view(xp, (window, window), axis=(1, 2))
  return win[:, ::stride, ::stride].max(axis=(-2, -1))


def _weights(op, arrays):
  return arrays[op["weight"]].astype(np.int64) - arrays[op["zero_point"]].astype(np.int64)


def run_op(op: dict, arrays: dict, *xs):
  kind = op["op"]
  if kind in ("conv", "dense"):
    w = arrays[op["weight"]]
    cin = w.shape[2] * op["groups"] if kind == "conv" else w.shape[0]
    if xs[0].shape[-1] != cin:
      raise ValueError(f"{kind} -> {op['out']}: input has {xs[0].shape[-1]} channels; the "
                       f"weight {op['weight']!r} {w.shape} takes {cin}")
  if kind == "conv":
    y = conv(xs[0], _weights(op, arrays), op["stride"], op["padding"], op["groups"])
    y = y + arrays[op["bias"]]
  elif kind == "dense":
    y = xs[0] @ _weights(op, arrays) + arrays[op["bias"]]
  elif kind == "requantize":
    y = requantize(xs[0], arrays[op["shift"]], op["min"], op["max"])
  elif kind == "add":
    if xs[0].shape != xs[1].shape:
      raise ValueError(f"add -> {op['out']}: operand shapes {xs[0].shape} and {xs[1].shape}")
    y = shift_round(xs[0], arrays[op["shift_a"]]) + shift_round(xs[1], arrays[op["shift_b"]])
  elif kind == "subsample_pad":
    s = op["stride"]
    y = np.pad(xs[0][:, ::s, ::s, :], ((0, 0),) * 3 + ((op["pad_before"], op["pad_after"]),))
  elif kind == "maxpool":
    y = maxpool(xs[0], op["window"], op["stride"], op["padding"])
  elif kind == "avgpool":
    y = avgpool(xs[0])
  else:
    raise ValueError(f"unknown op {kind!r}")
  return _int32(np.asarray(y, np.int64), f"{kind} -> {op['out']}")


def input_channels(manifest: dict, arrays: dict) -> int:
  """Channels of the images the export takes (its first layer's input channels)."""
  if isinstance(manifest.get("input_shape"), list) and len(manifest["input_shape"]) == 3:
    return int(manifest["input_shape"][2])
  op = next(o for o in manifest["ops"] if o["op"] in ("conv", "dense"))
  w = arrays[op["weight"]]
  return int(w.shape[2] * op["groups"]) if op["op"] == "conv" else int(w.shape[0])


def quantize_input(manifest: dict, arrays: dict, x):
  """Float32 NHWC image -> integers: ``clip(rint(x / 2**exp))``, round half to even.
  ValueError for integer pixels, NCHW layouts, other channel counts or non-finite values."""
  integrity.check_images(x, "images", channels=input_channels(manifest, arrays))
  info = manifest["input"]
  q = np.rint(np.asarray(x, np.float32) / _pow2(arrays[info["exp"]]))
  return np.clip(q, info["min"], info["max"]).astype(np.int64)


def run(manifest: dict, arrays: dict, x_int):
  """Integer forward: input integers -> int32 output integers (``[N, K]``)."""
  env = {manifest["input"]["tensor"]: np.asarray(x_int, np.int64)}
  for op in manifest["ops"]:
    ins = op["in"] if isinstance(op["in"], list) else [op["in"]]
    env[op["out"]] = run_op(op, arrays, *(env[i] for i in ins))
  return env[manifest["output"]["tensor"]].astype(np.int32)


def dequantize_output(manifest: dict, arrays: dict, acc):
  """int32 output -> float32 ``acc * 2**exp``."""
  return acc.astype(np.float32) * _pow2(arrays[manifest["output"]["exp"]])


def apply(manifest: dict, arrays: dict, x):
  """Float32 NHWC image -> float32 logits."""
  return dequantize_output(manifest, arrays, run(manifest, arrays, quantize_input(manifest, arrays, x)))


def main(argv):
  if len(argv) != 3:
    sys.exit("usage: python -m rapq_jax.reference_reader MODEL.json IMAGES.npy")
  try:
    manifest, arrays = load(argv[1])
    try:
      images = np.load(argv[2], allow_pickle=False)
    except (OSError, ValueError) as err:
      raise ValueError(f"{argv[2]}: cannot be read as a .npy array ({err})") from None
    logits = apply(manifest, arrays, images)
  except (ValueError, OverflowError) as err:
    sys.exit(f"error: {err}")
  print(json.dumps({"predictions": logits.argmax(-1).tolist()}))


if __name__ == "__main__":
  main(sys.argv)
