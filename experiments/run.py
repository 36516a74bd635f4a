r"""Runs quantization methods on one experiment config and reports test accuracy.

  python -m experiments.run                      # default: Fashion-MNIST ResNet, naive/BRECQ/RAPQ at W4A4, W2A4
  python -m experiments.run --config cifar10_resnet20 --methods fp
  python -m experiments.run --config path/to/config.py --methods fp --config.eval_batch_size=500

`--config` takes a name from experiments/configs or a config file path; any
config field can be overridden as `--config.<field>=<value>`.

Starting the same command again with the same --workdir resumes a killed run: finished
methods and finished reconstruction units are loaded from the run directory, and the
results equal those of an uninterrupted run. Another config in that directory is refused.
This module parses the flags; the job itself is ``experiments.job.run``.
"""
import os
import pathlib
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import configs
from experiments import host_memory
from experiments import job
from experiments import pipeline
from experiments import validate
from rapq_jax import integrity
from rapq_jax import resume

DEFAULT_SHARED_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared"
MIN_BITS, MAX_BITS = 2, 8
CACHED_COMPILE_S = 0.2   # programs compiled faster are not worth a file read


def parse_methods(text: str) -> tuple[str, ...]:
  """'fp,rapq' -> ('fp', 'rapq'); every name must be a key of ``job.METHODS``."""
  names = tuple(name.strip() for name in text.split(","))
  for name in names:
    if name not in job.METHODS:
      raise ValueError(f"unknown method {name!r}; accepted: {', '.join(job.METHODS)}")
  return names


def parse_distributed(text: str) -> dict:
  """'auto' -> {} (``jax.distributed.initialize`` detects Slurm, Open MPI or TPU);
  'HOST:PORT,NUM_PROCESSES,PROCESS_ID' -> its keyword arguments."""
  if text == "auto":
    return {}
  parts = [p.strip() for p in text.split(",")]
  if (len(parts) != 3 or not re.fullmatch(r"[^:\s]+:\d+", parts[0])
      or not all(p.isdigit() for p in parts[1:]) or int(parts[2]) >= int(parts[1])):
    raise ValueError(f"bad --distributed {text!r}: expected 'auto' or "
                     "HOST:PORT,NUM_PROCESSES,PROCESS_ID with 0 <= PROCESS_ID < NUM_PROCESSES")
  return dict(coordinator_address=parts[0], num_processes=int(parts[1]),
              process_id=int(parts[2]))


def parse_bits(text: str) -> tuple[tuple[int, int], ...]:
  """'4/4,2/4' -> ((4, 4), (2, 4)): weight/activation bit widths, each MIN_BITS..MAX_BITS."""
  pairs = []
  for token in text.split(","):
    parts = token.strip().split("/")
    if len(parts) != 2 or not all(p.isdigit() and MIN_BITS <= int(p) <= MAX_BITS for p in parts):
      raise ValueError(
          f"bad bit-width pair {token!r}: expected W/A with integers {MIN_BITS}..{MAX_BITS}, "
          "comma-separated (e.g. 4/4,2/4)")
    pairs.append((int(parts[0]), int(parts[1])))
  return tuple(pairs)


class _Parser(flags.ArgumentParser):
  """absl parser from a plain `str -> value` function that raises ValueError."""

  def __init__(self, parse_fn):
    self._parse_fn = parse_fn

  def parse(self, argument):
    return self._parse_fn(argument)

  def flag_type(self):
    return "string"


def _unknown_field(err: Exception, argv: list[str]) -> str:
  """The error line for a ``--config.<field>`` override of a field the config lacks."""
  field = str(err).strip("\"'")
  flags_named = [a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and field in a.split("=")[0].split(".")]
  return (f"FATAL Flags parsing error: {', '.join(flags_named) or field}: no such config field "
          f"{field!r}; the fields are those of experiments/configs/base.py (config.ptq: "
          "rapq_jax.config.PTQConfig)")


try:  # with a config file path, ml_collections applies the overrides of sys.argv right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", configs.config_path("fmnist_resnet"),
      f"Config name ({', '.join(configs.available())}) or config file path.")
except (AttributeError, KeyError) as _err:
  sys.exit(_unknown_field(_err, sys.argv))
_METHODS = flags.DEFINE(_Parser(parse_methods), "methods", "naive,brecq,rapq",
                        f"Comma-separated methods to run; accepted: {', '.join(job.METHODS)}.")
_BITS = flags.DEFINE(_Parser(parse_bits), "bits", "4/4,2/4",
                     "Comma-separated W/A bit widths of the quantized methods.")
_DISTRIBUTED = flags.DEFINE(
    _Parser(parse_distributed), "distributed", None,
    "Run as one process of a multi-host job: 'auto' or HOST:PORT,NUM_PROCESSES,PROCESS_ID "
    "(calls jax.distributed.initialize first; see README).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default runs/<config>-<timestamp>).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache, where a run finds the programs an "
    "earlier run with the same code, shapes and XLA flags compiled (default: "
    "$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/rapq_jax/xla; '' turns it off).")
_SHARED_DIR = flags.DEFINE_string(
    "shared_dir", None,
    "Replaces $RAPQ_SHARED_DIR in config paths (default: env RAPQ_SHARED_DIR, else ../shared).")


def _config_file(value: str) -> str:
  """`value` if it is a file, else the path of the config named `value`."""
  return value if os.path.isfile(value) else configs.config_path(value)


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with a bare `--config NAME` (or `--config=NAME`) replaced by its config file path."""
  return configs.resolve_config_argv(argv, _config_file)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    argv = resolve_config_argv(argv)
  except ValueError as e:
    sys.exit(f"FATAL Flags parsing error: --config: {e}")
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: override of an unknown field
    sys.exit(_unknown_field(e, argv))


def compilation_cache_dir(flag: str | None) -> str | None:
  """The persistent compilation cache's directory: ``flag`` if given ('' is none), else
  ``$JAX_COMPILATION_CACHE_DIR``, else ``rapq_jax/xla`` under ``$XDG_CACHE_HOME``
  (``~/.cache``)."""
  if flag is not None:
    return flag or None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "rapq_jax", "xla")


def use_compilation_cache(directory: str | None) -> None:
  """Makes JAX keep every program that took ``CACHED_COMPILE_S`` (or
  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``) or more to compile in ``directory``
  and load it from there on a later compilation (None: off). A program read back is the
  one compiled before: results are unchanged."""
  jax.config.update("jax_compilation_cache_dir", directory)
  if directory is not None and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHED_COMPILE_S)


def _fail(err) -> None:
  """Stops the run with one line on stderr: the command, not the code, is wrong."""
  sys.exit(f"experiments.run: error: {err}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Quiet by default: progress, per-unit lines and the table, but no library INFO logs
    # (orbax checkpoint saves, JAX backend probes); --verbosity=0 (-v 0) shows them.
    logging.set_verbosity(logging.WARNING)
  host_memory.trim_periodically()
  use_compilation_cache(compilation_cache_dir(_COMPILATION_CACHE.value))
  if _DISTRIBUTED.value is not None:
    # CPU processes exchange their collectives over gloo (GPU and TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**_DISTRIBUTED.value)
  name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
  shared_dir = _SHARED_DIR.value or os.environ.get("RAPQ_SHARED_DIR", str(DEFAULT_SHARED_DIR))
  workdir = pathlib.Path(_WORKDIR.value or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  try:
    job.run(pipeline.resolve_paths(_CONFIG.value, shared_dir), _METHODS.value, _BITS.value,
            workdir)
  except (validate.UserError, integrity.LockedError, resume.ConfigMismatchError) as err:
    _fail(err)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
