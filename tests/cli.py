"""``python -m experiments.run`` as a process, for the tests that start it."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# A Fashion-MNIST ResNet job small enough for a test: compiling is most of its time.
TINY = ["--config", "fmnist_resnet", "--bits", "4/4", "--config.weight_iters=12",
        "--config.act_iters=4", "--config.calibration_size=64", "--config.test_size=100",
        "--config.ptq.search_samples=32", "--config.ptq.search_sweeps=1"]


def start(args, workdir, log) -> subprocess.Popen:
  """Starts the job on CPU in the session's environment (its compilation cache and
  compile flags, tests/conftest.py); its output goes to the file ``log`` (a pipe left
  unread would stall it)."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args,
                             f"--workdir={workdir}"], cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, log, *, ok=True, timeout=600) -> str:
  """Waits for ``proc``; asserts it succeeded (or failed, ``ok=False``); its output."""
  proc.wait(timeout=timeout)
  out = pathlib.Path(log).read_text()
  assert (proc.returncode == 0) == ok, out[-3000:]
  return out
