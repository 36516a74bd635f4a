"""What keeps a wrong number from ever being reported: checks of inputs, checksums of
saved state, atomic writes with the user's umask, and one run per directory.

Imports only the standard library and numpy (``rapq_jax.reference_reader`` uses it and
must run without JAX).

* ``check_images``: float NHWC images, finite, with the expected channel count; an error
  names the image (and pixel) that is not, or says the layout is NCHW / the pixels are
  integers where preprocessed floats are expected.
* ``check_finite``: every leaf of a tree of arrays finite, else the leaf and index.
* ``digest`` / ``digests`` / ``verify``: sha256 of an array (dtype, shape and bytes), of
  every leaf of a tree of arrays, and of JSON; ``verify`` compares a loaded tree with
  the digests saved beside it and raises ``IntegrityError`` naming the file and leaf.
* ``atomic_write``: temp file + rename, mode ``0666 & ~umask`` (``mkstemp`` makes 0600).
* ``DirectoryLock``: an advisory ``fcntl.flock`` on ``<dir>/.lock`` holding the owner's
  pid; a second process gets ``LockedError`` naming it; the kernel drops the lock of a
  killed process, so a stale lock file never blocks.
"""
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping

import numpy as np

LOCK_NAME = ".lock"


class IntegrityError(ValueError):
  """Saved state whose content does not match its checksums (or cannot be read)."""


class LockedError(RuntimeError):
  """A directory already in use by another process."""


# ------------------------------------------------------------------ inputs

def _index(mask) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(mask)[0])


def check_images(x, what: str = "images", *, channels: int | None = None) -> None:
  """Raises ValueError unless ``x`` is a rank-4 float NHWC array of finite values with
  ``channels`` channels (when given). The message names ``what`` and, for a non-finite
  value, the image and pixel; integer pixels and channels-first (NCHW) arrays are named
  as such."""
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"{what} must be a rank-4 float32 NHWC array; got shape {shape}")
  kind = np.dtype(dtype)
  if np.issubdtype(kind, np.integer) or kind == np.bool_:
    raise ValueError(f"{what} have integer pixels (dtype {dtype}); expected preprocessed float32 "
                     "NHWC images (e.g. (x / 255 - mean) / std), not raw pixels")
  if np.issubdtype(kind, np.complexfloating) or kind.kind in "OUSV":
    raise ValueError(f"{what} have dtype {dtype}; expected float32 NHWC images")
  if channels is not None and shape[-1] != channels:
    layout = (f"; shape[1] = {channels} looks like channels-first (NCHW): transpose to NHWC "
              "with x.transpose(0, 2, 3, 1)" if shape[1] == channels else "")
    raise ValueError(f"{what} have {shape[-1]} channels (last axis of shape {tuple(shape)}); "
                     f"the model expects {channels} channels, NHWC{layout}")
  if shape[0] == 0:
    raise ValueError(f"{what}: the array holds no image (shape {tuple(shape)})")
  values = np.asarray(x)
  finite = np.isfinite(values)
  if not finite.all():
    n, h, w, c = _index(~finite)
    raise ValueError(f"{what}: image {n} has a non-finite value {values[n, h, w, c]} at pixel "
                     f"(h={h}, w={w}, c={c}); {int((~finite.reshape(len(values), -1)).any(1).sum())} "
                     "image(s) affected")


def leaves(tree, prefix: str = "") -> dict:
  """``{'a/b/c': leaf}`` of nested mappings (lists and tuples indexed), sorted by name."""
  if isinstance(tree, Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(leaves(v, f"{prefix}/{k}" if prefix else str(k)))
  return dict(sorted(out.items()))


def check_finite(tree, what: str) -> None:
  """Raises ValueError naming the first leaf of ``tree`` (nested dicts of arrays) with a
  NaN or infinite value, its index and how many values are bad."""
  for name, leaf in leaves(tree).items():
    a = np.asarray(leaf)
    if not np.issubdtype(a.dtype, np.floating):
      continue
    bad = ~np.isfinite(a)
    if bad.any():
      raise ValueError(f"{what}: tensor {name!r} (shape {a.shape}) has {int(bad.sum())} "
                       f"non-finite value(s), the first {a[_index(bad)] if a.ndim else a} at "
                       f"index {_index(bad) if a.ndim else ()}")


# ------------------------------------------------------------------ checksums

def digest(array) -> str:
  """sha256 of an array's dtype, shape and C-order bytes (hex)."""
  a = np.ascontiguousarray(np.asarray(array))
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def json_digest(obj) -> str:
  """sha256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def digests(tree) -> dict:
  """``{leaf name: digest}`` of a tree of arrays (see ``leaves``)."""
  return {name: digest(leaf) for name, leaf in leaves(tree).items()}


def verify(tree, expected: dict, where) -> None:
  """Raises ``IntegrityError`` naming ``where`` unless ``tree``'s leaves are exactly
  those of ``expected`` (from ``digests``) with equal checksums."""
  if not isinstance(expected, dict):
    raise IntegrityError(f"{where}: no checksum manifest (expected a dict of sha256 digests)")
  got = digests(tree)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise IntegrityError(f"{where}: arrays {missing} missing, {extra} unexpected against its "
                         "checksum manifest")
  bad = [k for k in expected if got[k] != expected[k]]
  if bad:
    raise IntegrityError(f"{where}: checksum mismatch of {', '.join(bad)} (sha256 "
                         f"{got[bad[0]][:12]}... read, {str(expected[bad[0]])[:12]}... saved): "
                         "the file is damaged")


def verify_json(obj, expected, where, what: str) -> None:
  """Raises ``IntegrityError`` unless ``json_digest(obj) == expected``."""
  if json_digest(obj) != expected:
    raise IntegrityError(f"{where}: checksum mismatch of {what}: the file is damaged")


# ------------------------------------------------------------------ files

def umask() -> int:
  """The process umask (read without changing it where /proc allows)."""
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write(path, data) -> pathlib.Path:
  """Writes ``data`` (str, bytes, or a function of a binary file) to ``path`` through a
  temporary file and a rename, so a reader never sees a half-written file; the file
  gets the mode ``open`` would give it (``0666 & ~umask``)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    os.fchmod(fd, 0o666 & ~umask())
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


# ------------------------------------------------------------------ one run per directory

class DirectoryLock:
  """Advisory exclusive lock of a directory for this process (``with`` or
  ``acquire``/``release``). ``LockedError`` names the pid recorded by the holder."""

  def __init__(self, directory):
    self.path = pathlib.Path(directory) / LOCK_NAME
    self._fd = None

  def acquire(self) -> "DirectoryLock":
    import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise LockedError(f"{self.path.parent} is in use by another run (process {holder} holds "
                        f"{self.path}); wait for it to finish or use another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)        # closing drops the flock; the file stays for the next run
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
