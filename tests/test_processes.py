"""``python -m experiments.run`` as real processes, against one uninterrupted run of the
same tiny job: a job killed by SIGKILL after its first unit and started again ends with
the same results and models; two processes joined by ``jax.distributed`` on localhost
(one CPU device each, gloo collectives, ``--distributed=HOST:PORT,2,ID``) give the same
integers, exponents, search moves and top-1 as one process, and only process 0 writes
(README, 'Several hosts')."""
import json
import signal
import socket
import time

import chex
import jax
import pytest

import cli

from rapq_jax import export

ARGS = [*cli.TINY, "--methods", "rapq", "--config.ptq.search=after"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """The run directory of the job run once, uninterrupted, in one process."""
  root = tmp_path_factory.mktemp("plain")
  cli.finish(cli.start(ARGS, root / "run", root / "run.log"), root / "run.log")
  return root / "run"


def _results(run_dir):
  return json.loads((run_dir / "results.json").read_text())["results"]


def _same_models(a, b):
  saved = [export.load_model(d / "models" / "rapq_w4a4") for d in (a, b)]
  chex.assert_trees_all_equal(saved[0].weights, saved[1].weights)
  chex.assert_trees_all_equal(saved[0].acts, saved[1].acts)
  assert jax.tree.leaves(saved[0].acts), "no activation exponents compared"


@pytest.mark.slow(seconds=45)
def test_killed_run_resumes_to_identical_results(plain, tmp_path):
  run_dir = tmp_path / "resumed"
  proc = cli.start(ARGS, run_dir, tmp_path / "killed.log")
  units = run_dir / "units" / "rapq_w4a4"
  deadline = time.monotonic() + 300
  while not (units / "unit_conv1").is_dir() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (units / "unit_conv1").is_dir() and not (units / "unit_linear").exists()
  out = cli.finish(cli.start(ARGS, run_dir, tmp_path / "resumed.log"), tmp_path / "resumed.log")
  assert f"loaded {run_dir / 'results' / 'fp.json'}" in out
  assert sum("(loaded)" in line for line in out.splitlines()) >= 1
  a, b = _results(plain), _results(run_dir)
  assert [(r["method"], r["top1"], r["top5"]) for r in a] == [
      (r["method"], r["top1"], r["top5"]) for r in b]
  for key in ("weight_exponents", "loss_curves", "lp", "search"):
    if key == "search":
      for entry in (*a[1][key].values(), *b[1][key].values()):
        entry.pop("seconds")
    assert a[1][key] == b[1][key], key
  # The saved models: integer weights with their per-channel exponents and zero points,
  # and the activation exponents, the ones the network-wide search after reconstruction
  # moves (resumed units are loaded before it runs).
  _same_models(plain, run_dir)
  assert "after" in a[1]["search"], "the run did not search"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow(seconds=45)
def test_two_processes_quantize_like_one_and_only_process_0_writes(plain, tmp_path):
  """Process 1 is given a directory of its own here, to show that it writes nothing
  there; to resume, every process needs the same directory (a shared filesystem)."""
  port = _free_port()
  run_dirs = [tmp_path / "run", tmp_path / "process1_run"]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = [cli.start([*ARGS, f"--distributed=localhost:{port},2,{i}"], d, log)
           for i, (d, log) in enumerate(zip(run_dirs, logs))]
  outs = [cli.finish(p, log) for p, log in zip(procs, logs)]
  for out in outs:   # both computed the whole job and printed its results
    assert "rapq   W4A4  top-1" in out
  assert f"wrote {run_dirs[0]}/results.json" in outs[0] and "wrote" not in outs[1]
  assert not run_dirs[1].exists()
  record = json.loads((run_dirs[0] / "results.json").read_text())
  assert len(record["machine"]["devices"]) == 2    # one job over both processes' devices
  (two,), (one,) = ([r for r in _results(d) if r["method"] == "rapq"]
                    for d in (run_dirs[0], plain))
  for key in ("top1", "top5", "agreement", "weight_exponents", "power_of_two", "lp"):
    assert two[key] == one[key], key
  assert two["search"]["after"]["moved"] == one["search"]["after"]["moved"]
  # The KL is a sum over rows split over the devices: equal up to its summation order.
  assert abs(two["kl_to_reference"] - one["kl_to_reference"]) < 1e-6
  _same_models(plain, run_dirs[0])
