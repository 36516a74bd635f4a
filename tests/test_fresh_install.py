"""What a new user gets: the README's main job from an installed package, with no data but
what the project ships, and a quiet terminal.

The package is built as a wheel from a copy of the source tree (no editable install, no
repository beside it) and installed into a folder of its own; the job then runs from an
empty working directory with Debian's Fashion-MNIST directory hidden
(RAPQ_FASHION_MNIST_DIR pointed at an empty folder). A file the job needs but the
package does not install, or a path that exists only on our machines, fails here.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import compile_flags
from experiments import data, embed_data

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "experiments" / "checkpoints"
# A small budget that still reconstructs (measured at this commit on these 1000 test
# images: FP 91.1, rapq 90.8 % at W4A4 (no search, the default), round to nearest
# (naive) 36.2 %; runs are deterministic). naive is not run here: the in-process tests
# cover it, and it took a third of this test's time.
SMALL = ["--methods", "rapq", "--bits", "4/4", "--config.weight_iters=40",
         "--config.act_iters=10", "--config.calibration_size=128", "--config.test_size=1000"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """A folder holding the project as `pip install` of its wheel puts it (with --target)."""
  root = tmp_path_factory.mktemp("install")
  source = root / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
  target = root / "site"
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
       "--no-cache-dir", "--target", str(target), str(source)],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return target


@pytest.mark.slow(seconds=45)
def test_default_job_runs_from_the_installed_package_with_shipped_data_only(installed, tmp_path):
  """Also the quality guard: a change that breaks RAPQ's reconstruction fails here."""
  hidden = tmp_path / "no-fashion-mnist"
  hidden.mkdir()
  work = tmp_path / "cwd"
  work.mkdir()
  env = {**os.environ, "PYTHONPATH": str(installed), "RAPQ_FASHION_MNIST_DIR": str(hidden),
         "XLA_FLAGS": compile_flags.for_long_run(os.environ.get("XLA_FLAGS", ""))}
  where = subprocess.run([sys.executable, "-c", "import experiments; print(experiments.__file__)"],
                         cwd=work, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(installed)), where.stdout
  out = subprocess.run([sys.executable, "-m", "experiments.run", *SMALL, "--workdir=run"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  run = work / "run"
  for name in ("results.json", "results.md", "top1.png", "weight_exponents.png",
               "reconstruction_loss.png", "config.json"):
    assert (run / name).stat().st_size > 0, name
  record = json.loads((run / "results.json").read_text())
  top1 = {r["method"]: r["top1"] for r in record["results"]}
  assert list(top1) == ["fp", "rapq"]
  assert top1["rapq"] >= top1["fp"] - 8, top1   # round to nearest is 55 points below FP
  assert all(r["power_of_two"] for r in record["results"][1:])
  assert record["config"]["model"] == "fmnist_resnet"
  assert record["git"] == {"commit": None, "dirty": None}  # no checkout beside the package
  table = (run / "results.md").read_text()
  assert "| rapq | W4A4 |" in table
  assert table in out.stdout  # the table ends the terminal output
  # Quiet: no absl/orbax INFO lines, and no progress-bar frames in a pipe.
  terminal = out.stdout + out.stderr
  assert not [l for l in terminal.splitlines() if l[:1] == "I" and l[1:5].isdigit()], terminal
  assert "\r" not in terminal
  assert "rapq   W4A4  top-1" in out.stdout


def test_missing_data_file_is_one_line_naming_it(installed, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(installed)}
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--methods", "fp",
                        "--config.dataset.test=absent.npz", f"--workdir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "experiments.run: error: config.dataset.test: npz dataset "
      f"{installed / 'absent.npz'} not found; give an .npz with 'images' uint8 [N, H, W, C] "
      "and 'labels' (--config.dataset.train/test=PATH), or another source: "
      "--config.dataset.source=fashion_mnist (Debian's IDX files) or tfds"]
  assert not (tmp_path / "run").exists()


def test_shipped_data_is_what_embed_data_writes(fashion_mnist_dir, tmp_path):
  """The committed arrays are Fashion-MNIST (Debian's IDX files), chosen as documented."""
  embed_data.write(fashion_mnist_dir, tmp_path)
  for name in (embed_data.TRAIN_FILE, embed_data.TEST_FILE):
    with np.load(CHECKPOINTS / name) as committed, np.load(tmp_path / name) as written:
      assert committed.files == written.files == ["images", "labels"]
      for key in committed.files:
        np.testing.assert_array_equal(committed[key], written[key])


def test_shipped_data_shapes_balance_and_licence():
  pool_images, pool_labels = data.load_npz(CHECKPOINTS / embed_data.TRAIN_FILE)
  test_images, test_labels = data.load_npz(CHECKPOINTS / embed_data.TEST_FILE)
  assert pool_images.shape == (4000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(pool_labels), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
  assert "Zalando SE" in (CHECKPOINTS / "FASHION_MNIST_LICENSE").read_text()
