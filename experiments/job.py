"""The quantization job behind ``python -m experiments.run``: every method at every bit
width on one config, each run's record kept in the run directory as it finishes (so a
killed job resumes after the last one), then the table, plots and results.json.

Over several processes (``jax.distributed``) every process computes and only process 0
writes (the run directory, its lock, records, units, models, plots); every process
reads the directory to resume, so it must be one that all of them see.

``run(config, methods, bits, workdir)`` is the whole job; ``experiments.run`` parses the
flags and calls it.
"""
import contextlib
import copy
import functools
import gc
import json
import pathlib
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from experiments import methods
from experiments import pipeline
from experiments import report
from experiments import validate
from rapq_jax import config as ptq_config_lib
from rapq_jax import evaluate as evaluate_lib
from rapq_jax import integrity
from rapq_jax import resume


def run_fp(config: ml_collections.ConfigDict, data: pipeline.Data, *,
           reference_logits: np.ndarray) -> dict:
  """Accuracy of the pretrained full-precision model, from its logits on the test split."""
  del config
  return evaluate_lib.scores(reference_logits, data.test_labels)


# Method name -> function(config, data, reference_logits=FP logits, ...) -> dict(top1,
# top5, n, ...). Quantized methods run once per --bits pair, with config.wbits /
# config.abits set to it.
METHODS = {"fp": run_fp, **{name: functools.partial(methods.run_method, method=name)
                            for name in methods.QUANT_METHODS}}
UNQUANTIZED = frozenset({"fp"})


def format_result(result: dict) -> str:
  """One line: method, bit widths, top-1 and top-5 accuracy (and, for a quantized
  model, its top-1 agreement with FP and KL to FP)."""
  bits = "FP32" if result["wbits"] is None else f"W{result['wbits']}A{result['abits']}"
  top5 = "n/a" if result["top5"] is None else f"{result['top5']:.2f} %"
  vs_fp = (f"agrees with FP {result['agreement']:.2f} %  KL to FP {result['kl_to_reference']:.4f}  "
           if "agreement" in result else "")
  return (f"{result['method']:<6} {bits:<5} top-1 {result['top1']:.2f} %  top-5 {top5}  "
          f"{vs_fp}(n={result['n']}, {result['wall_seconds']:.0f} s)")


def write_outputs(workdir: pathlib.Path, config, results: list[dict], env: dict) -> None:
  """results.json (every figure, config, environment), results.md and the plots.
  results.json is written last and atomically: its presence means the run finished.
  Its ``git`` is the commit every result was computed at when they agree (a resumed run
  loads results computed by an earlier start), else this start's; each result keeps
  its own ``git`` (``run_once``)."""
  table = report.results_table(results)
  integrity.atomic_write(workdir / "results.md", table)
  report.plot_top1(results, workdir / "top1.png")
  report.plot_exponents(results, workdir / "weight_exponents.png")
  report.plot_losses(results, workdir / "reconstruction_loss.png")
  record = dict(config=json.loads(config.to_json_best_effort()), results=results, **env)
  commits = {json.dumps(r.get("git"), sort_keys=True) for r in results}
  if len(commits) == 1 and results[0].get("git"):
    record["git"] = results[0]["git"]
  integrity.atomic_write(workdir / "results.json", json.dumps(record, indent=1, default=float))
  print("\n" + table + f"\nwrote {workdir}/results.json, results.md and plots", flush=True)


def open_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Binds ``workdir`` to ``config``: the first start writes config.json; a later start
  (a resume) must bring the same config, else ``resume.ConfigMismatchError`` names the
  differing fields."""
  path = workdir / "config.json"
  if path.exists():
    stored = json.loads(path.read_text())
    # A PTQConfig field added since the run started was unset there (its ADDED value).
    stored["ptq"] = {**{k: None for k in ptq_config_lib.ADDED}, **stored.get("ptq", {})}
    resume.check_same_config(stored,
                             json.loads(config.to_json_best_effort()), f"run directory {workdir}",
                             f"the config in {path} (to resume that run) or a new --workdir")
  else:
    integrity.atomic_write(path, config.to_json_best_effort(indent=2))


def run_once(workdir: pathlib.Path, method: str, wbits: int | None, abits: int | None,
             config: ml_collections.ConfigDict, data: pipeline.Data,
             fp_logits: Callable[[], np.ndarray], git: dict | None = None) -> dict:
  """The record of one method at one bit width: loaded from ``workdir/results/`` if it
  finished before (and its checksum matches), else computed (quantized units kept in
  ``workdir/units/`` as they finish, so a killed run resumes after the last one) and
  saved there atomically with its checksum. ``fp_logits()`` gives the FP model's test
  logits, computed by the first run that needs them (``fp``, or a quantized run
  resumed after ``fp`` was loaded) and kept for the job's other runs. A computed record
  carries ``git``, the commit of the code that computed it (``report.environment``), so a
  run resumed at a later commit still says where each figure came from."""
  path = workdir / "results" / f"{methods.run_name(method, wbits, abits)}.json"
  if _on_process_0(path.exists()):
    if not path.exists():
      raise validate.UserError(
          f"{path} exists for process 0 but not for process {jax.process_index()}: give "
          "every process the same --workdir on a filesystem they all see")
    try:
      record = report.read_record(path)
      print(f"loaded {path}", flush=True)
      return record
    except integrity.IntegrityError as err:   # never reported: computed again
      print(f"{err}; computing it again", flush=True)
  start, lookups = time.perf_counter(), report.cache_lookups()
  kwargs = {} if method in UNQUANTIZED else {"save_dir": workdir / "models",
                                             "store_dir": workdir / "units"}
  result = METHODS[method](config, data, reference_logits=fp_logits(), **kwargs)
  result.setdefault("wall_seconds", time.perf_counter() - start)
  # What the persistent compilation cache saved this run (its timings depend on it).
  result["compilation_cache"] = {k: v - lookups[k] for k, v in report.cache_lookups().items()}
  record = dict(method=method, wbits=wbits, abits=abits, **result)
  if git is not None:
    record["git"] = git
  return report.write_record(path, record) if _primary() else report.as_written(record)


def _primary() -> bool:
  """Whether this process writes the run directory (process 0 of a distributed job)."""
  return jax.process_index() == 0


def _on_process_0(flag: bool) -> bool:
  """``flag`` as process 0 has it, on every process (every process then makes the same
  choice and joins the same computations)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def release_compiled_programs() -> None:
  """Drops every compiled program and the arrays nothing refers to any more. The job
  calls it after each quantized run: that run's programs are its method's and bit
  widths' own (the next run compiles its own, or loads them from the persistent
  compilation cache), and kept they added up over the job's runs (ResNet-20 rapq at
  W4A4 then W2A4, 500/125 iterations, one quiet 2-core Xeon: peak RSS 1.57 GB kept,
  1.23 GB dropped, for about 5 s more on W2A4: JAX traces and lowers again what it had
  cached)."""
  jax.clear_caches()
  gc.collect()


def plan(config: ml_collections.ConfigDict, names, bits) -> list[tuple]:
  """``[(method, wbits, abits, config)]``: ``fp`` first when anything is quantized (every
  table reports the drop from FP), quantized methods once per ``bits`` pair with
  ``config.wbits`` / ``config.abits`` set to it."""
  if any(m not in UNQUANTIZED for m in names) and "fp" not in names:
    names = ("fp",) + tuple(names)
  runs = []
  for method in names:
    for wbits, abits in ([(None, None)] if method in UNQUANTIZED else bits):
      method_config = config
      if wbits is not None:
        method_config = copy.deepcopy(config)
        method_config.wbits, method_config.abits = wbits, abits
      runs.append((method, wbits, abits, method_config))
  return runs


def run(config: ml_collections.ConfigDict, names, bits, workdir: pathlib.Path) -> list[dict]:
  """Runs ``names`` at ``bits`` on ``config`` in ``workdir``; returns the records.

  Everything is checked before anything is written; a problem the command can fix is a
  ``validate.UserError``, a ``integrity.LockedError`` (another process holds ``workdir``)
  or a ``resume.ConfigMismatchError`` (``workdir`` belongs to another config)."""
  try:
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
  except ValueError as err:
    raise validate.UserError(
        f"config.matmul_precision={config.matmul_precision!r}: {err}") from None
  runs = plan(config, names, bits)
  data = validate.prepare(config, [(m, c) for m, _, _, c in runs])
  if _primary():
    workdir.mkdir(parents=True, exist_ok=True)
  # One run per directory: held until the job ends, dropped if its process is killed.
  with integrity.DirectoryLock(workdir) if _primary() else contextlib.nullcontext():
    if _primary():
      open_workdir(workdir, config)
    env = report.environment()  # the code as it was when the run started
    fp_logits = functools.cache(lambda: pipeline.fp_logits(config, data))
    results = []
    for k, (method, wbits, abits, method_config) in enumerate(runs):
      if k and runs[k - 1][0] not in UNQUANTIZED:
        release_compiled_programs()
      results.append(run_once(workdir, method, wbits, abits, method_config, data, fp_logits,
                              env["git"]))
      print(format_result(results[-1]), flush=True)
    if _primary():
      write_outputs(workdir, config, results, env)
  return results
