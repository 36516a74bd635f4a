"""``python -m experiments.run`` as real processes: two processes joined by
``jax.distributed`` on localhost (one CPU device each, gloo collectives,
``--distributed=HOST:PORT,2,ID``) compute the job together and only process 0 writes
(README, 'Several hosts'); a one-process job killed by SIGKILL after its first unit and
started again ends with the two processes' integers, exponents, search moves and top-1.

That one comparison shows both that a killed run resumes to the uninterrupted result and
that two processes quantize like one: a fault in either would have to reproduce the other
bit for bit to pass. Each half is also shown alone, without a process boundary:
tests/test_resume.py (a crashed run resumed in one process equals the uninterrupted one,
reports and loss curves included) and tests/test_parallel.py (4 devices give the 1-device
result)."""
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The job run uninterrupted by two processes: their run directories (process 1 is given
  one of its own, to show that it writes nothing there; to resume, every process needs the
  same directory, a shared filesystem) and their outputs."""
  root = tmp_path_factory.mktemp("two_processes")
  port = _free_port()
  run_dirs = [root / "run", root / "process1_run"]
  logs = [root / f"process{i}.log" for i in range(2)]
  procs = [cli.start([*ARGS, f"--distributed=localhost:{port},2,{i}"], d, log)
           for i, (d, log) in enumerate(zip(run_dirs, logs))]
  return run_dirs, [cli.finish(p, log) for p, log in zip(procs, logs)]


def _results(run_dir):
  return json.loads((run_dir / "results.json").read_text())["results"]


@pytest.mark.slow(seconds=30)
def test_two_processes_compute_one_job_and_only_process_0_writes(two_processes):
  run_dirs, outs = two_processes
  for out in outs:   # both computed the whole job and printed its results
    assert "rapq   W4A4  top-1" in out
  assert f"wrote {run_dirs[0]}/results.json" in outs[0] and "wrote" not in outs[1]
  assert not run_dirs[1].exists()
  record = json.loads((run_dirs[0] / "results.json").read_text())
  assert len(record["machine"]["devices"]) == 2    # one job over both processes' devices


@pytest.mark.slow(seconds=40)
def test_killed_run_resumes_to_what_two_processes_compute(two_processes, tmp_path):
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
  two = two_processes[0][0]
  a, b = _results(two), _results(run_dir)
  assert [(r["method"], r["top1"], r["top5"]) for r in a] == [
      (r["method"], r["top1"], r["top5"]) for r in b]
  for key in ("agreement", "weight_exponents", "power_of_two", "lp"):
    assert a[1][key] == b[1][key], key
  assert "after" in a[1]["search"], "the run did not search"
  assert a[1]["search"]["after"]["moved"] == b[1]["search"]["after"]["moved"]
  # The KL is a sum over rows split over the devices: equal up to its summation order.
  assert abs(a[1]["kl_to_reference"] - b[1]["kl_to_reference"]) < 1e-6
  # The saved models: integer weights with their per-channel exponents and zero points,
  # and the activation exponents, the ones the network-wide search after reconstruction
  # moves (resumed units are loaded before it runs).
  saved = [export.load_model(d / "models" / "rapq_w4a4") for d in (two, run_dir)]
  chex.assert_trees_all_equal(saved[0].weights, saved[1].weights)
  chex.assert_trees_all_equal(saved[0].acts, saved[1].acts)
  assert jax.tree.leaves(saved[0].acts), "no activation exponents compared"
