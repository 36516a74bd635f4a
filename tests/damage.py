"""Damaging saved files on purpose: one flipped bit, and the property every loader of
checksummed state must have (shared by tests/test_resume.py and tests/test_export.py)."""
import pathlib
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapq_jax import integrity

# Each example copies a small directory and loads it once: a modest count keeps the
# three property tests at a few seconds. When orbax fails to restore a damaged
# checkpoint it leaves a callback on its closed event loop, which pytest reports as an
# unraisable exception; the tests that load damaged orbax checkpoints ignore that.
EXAMPLES = 25


def flip(path: pathlib.Path, offset: int, bit: int = 0) -> None:
  """Flips one bit of ``path`` at byte ``offset`` (taken modulo the file size)."""
  data = bytearray(path.read_bytes())
  data[offset % len(data)] ^= 1 << bit
  path.write_bytes(bytes(data))


def largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _same(x, y) -> bool:
  x, y = np.asarray(x), np.asarray(y)
  return x.dtype == y.dtype and x.shape == y.shape and bool(
      np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.floating)))


def same_tree(a, b) -> bool:
  """Equal leaf names, dtypes, shapes and values (NaN equal to NaN)."""
  a, b = integrity.leaves(a), integrity.leaves(b)
  return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)


def assert_every_flip_detected_or_harmless(source: pathlib.Path, load, reference):
  """Property: flipping any bit of any file under ``source`` (a directory) either makes
  ``load(copy)`` raise ``IntegrityError`` (or return None: "nothing stored") or leaves
  what it loads equal to ``reference`` (``same_tree``). Returns the outcomes seen."""
  files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
  seen = set()

  @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow])
  @given(st.sampled_from(files), st.integers(0, 2 ** 20), st.integers(0, 7))
  def check(name, offset, bit):
    with tempfile.TemporaryDirectory() as tmp:
      copy = pathlib.Path(tmp) / source.name
      shutil.copytree(source, copy)
      flip(copy / name, offset, bit)
      try:
        loaded = load(copy)
      except integrity.IntegrityError:
        seen.add("detected")
        return
      if loaded is None:
        seen.add("absent")
        return
      assert same_tree(loaded, reference), f"flip in {name} at {offset}:{bit} changed the load"
      seen.add("harmless")

  check()
  return seen
