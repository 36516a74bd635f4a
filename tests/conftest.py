"""Shared fixtures.

Tests that need the shared CIFAR-10 data or pretrained models find it through the
environment variable ``RAPQ_SHARED_DIR`` (``.ci/run`` sets it to ``../shared``).
Outside CI a missing directory skips those tests; with ``CI=true`` it fails them,
so CI never passes without having run them.

The session shares one XLA compilation cache (a temporary directory, unless
``JAX_COMPILATION_CACHE_DIR`` is set) with the subprocesses its tests start, so a
computation that several tests or processes build (the same step of a tiny model,
``experiments.run`` started again to resume) compiles once.

Compiling, not running, is most of a test's time: the suite's programs are tiny and each
is compiled once. So the session and its subprocesses compile for XLA's CPU backend
without LLVM's optimisation passes, with its older loop emitters and generating each
program's code on one thread (``compile_flags.FAST_COMPILE``, added to ``XLA_FLAGS``; the
tiny Fashion-MNIST job of tests/cli.py compiled in 24 s with the first two, 32 s with
the first alone). That changes the speed of the machine code and the last bits of some
float results (tests/compile_flags.py), so every equality a test asserts compares runs
made with the same flags. The few tests that run real-size work in a child process
(ResNet-20's integer path, the whole CIFAR-10 test split, the shipped-data job) compile
it with ``compile_flags.LONG_RUN`` instead.

The suite runs in two worker processes (pytest-xdist, ``-n 2 --dist loadfile`` in
setup.cfg: a file's tests share one process and its module fixtures). Files are handed
out in collection order (``--no-loadscope-reorder``), and collection puts the files
with the most ``slow(seconds=...)`` first (``pytest_collection_modifyitems``), so the
last files a worker takes are short ones and neither waits long for the other (xdist's
own order, most tests first, started the few long end-to-end files last). Every XLA CPU
executable holds its own memory mappings, and a process that keeps thousands alive runs
into the kernel's limit on mappings (``vm.max_map_count``, 65530 by default), where the
next compilation crashes the interpreter (seen in CI as SIGABRT / SIGSEGV inside XLA's
compiler). So after a test module, when the process holds more than half that many
mappings, its in-memory compiled programs are dropped (``jax.clear_caches``; the
persistent cache above still serves them).
"""
import atexit
import collections
import gc
import os
import pathlib
import shutil
import tempfile

import pytest

import compile_flags
from experiments import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="rapq-jax-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["XLA_FLAGS"] = compile_flags.with_fast_compile(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_MAX_MAPPINGS = 65530   # Linux's default vm.max_map_count


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops the in-memory compiled programs after a module if mappings run high."""
  yield
  maps = pathlib.Path("/proc/self/maps")
  if not maps.is_file() or len(maps.read_bytes().splitlines()) < _MAX_MAPPINGS // 2:
    return
  import jax  # pylint: disable=import-outside-toplevel  (after the cache settings above)
  jax.clear_caches()
  gc.collect()


def pytest_collection_modifyitems(items):
  """Orders the files by their tests' ``slow`` seconds (most first), keeping the order
  of the tests within a file and of files that tie."""
  seconds = collections.Counter()
  for item in items:
    for mark in item.iter_markers("slow"):
      seconds[item.path] += mark.kwargs.get("seconds", 10)
  first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
  items.sort(key=lambda item: (-seconds[item.path], first_seen[item.path]))


def _missing(what: str):
  msg = f"{what} not found; set RAPQ_SHARED_DIR to the shared data directory"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(msg)
  pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """Root of the shared data (``data/``, ``models/``)."""
  root = pathlib.Path(os.environ.get("RAPQ_SHARED_DIR", REPO_ROOT.parent / "shared"))
  if not (root / "data" / "cifar10_jpeg" / "test.npz").is_file():
    _missing(f"shared data at {root}")
  return root


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
  """Debian's Fashion-MNIST IDX files (apt-get install -y dataset-fashion-mnist)."""
  root = pathlib.Path(data.FASHION_MNIST_DIR)  # RAPQ_FASHION_MNIST_DIR, else Debian's path
  if not (root / "t10k-images-idx3-ubyte.gz").is_file():
    _missing(f"Fashion-MNIST IDX files at {root}")
  return root
