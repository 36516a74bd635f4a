"""Reference reader of the integer export (``rapq_jax.export.save_npz``), plain numpy.

No JAX: this module imports only ``json``, ``pathlib``, ``numpy`` and (for checksums)
``rapq_jax.integrity``, and is meant as
the executable specification a C port follows op by op (docs/INTEGER.md). Arithmetic
is int64 with every op's result checked to fit int32, so results equal an int32
implementation's (``rapq_jax.integer.lower`` guarantees no int32 overflow).

  python -m rapq_jax.reference_reader model.json images.npy   # float32 NHWC, preprocessed
"""
import json
import pathlib
import sys

import numpy as np

from rapq_jax import integrity

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1


def manifest_digest(manifest: dict) -> str:
  """sha256 of the manifest without its ``checksums`` entry (canonical JSON)."""
  return integrity.json_digest({k: v for k, v in manifest.items() if k != "checksums"})


def load(path) -> tuple[dict, dict]:
  """(manifest, {name: ndarray}) of ``path.json`` / ``path.npz``, verified against the
  manifest's checksums (``integrity.IntegrityError`` naming the damaged file)."""
  path = pathlib.Path(path)
  jpath, npath = path.with_suffix(".json"), path.with_suffix(".npz")
  try:
    manifest = json.loads(jpath.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise integrity.IntegrityError(f"{jpath}: not valid JSON ({err})") from None
  if not isinstance(manifest, dict):
    raise integrity.IntegrityError(f"{jpath}: expected a JSON object (the manifest)")
  try:
    with np.load(npath, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except FileNotFoundError:
    raise
  except Exception as err:  # pylint: disable=broad-except  (a damaged zip raises anything)
    raise integrity.IntegrityError(f"{npath}: cannot be read ({type(err).__name__}: {err}); "
                                   "the file is damaged") from None
  sums = manifest.get("checksums")
  if not isinstance(sums, dict) or manifest_digest(manifest) != sums.get("manifest"):
    raise integrity.IntegrityError(f"{jpath}: checksum mismatch of the manifest: the file is "
                                   "damaged")
  integrity.verify(arrays, sums.get("arrays"), npath)
  for name, info in manifest["arrays"].items():
    if arrays[name].dtype.str != info["dtype"] or list(arrays[name].shape) != info["shape"]:
      raise ValueError(f"array {name!r} does not match its manifest entry {info}")
  return manifest, arrays


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
  if kind == "conv":
    y = conv(xs[0], _weights(op, arrays), op["stride"], op["padding"], op["groups"])
    y = y + arrays[op["bias"]]
  elif kind == "dense":
    y = xs[0] @ _weights(op, arrays) + arrays[op["bias"]]
  elif kind == "requantize":
    y = requantize(xs[0], arrays[op["shift"]], op["min"], op["max"])
  elif kind == "add":
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


def quantize_input(manifest: dict, arrays: dict, x):
  """Float32 NHWC image -> integers: ``clip(rint(x / 2**exp))``, round half to even."""
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
  manifest, arrays = load(argv[1])
  logits = apply(manifest, arrays, np.load(argv[2]))
  print(json.dumps({"predictions": logits.argmax(-1).tolist()}))


if __name__ == "__main__":
  main(sys.argv)
