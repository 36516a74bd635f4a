"""Specification of what keeps a wrong number from being reported (rapq_jax.integrity,
experiments.validate): a run's config, data and checkpoint are checked before its
directory is created or bound, each problem named in one line; non-finite values,
integer pixels and NCHW layouts are errors; files get the user's umask; one run holds a
directory at a time. Checksums: tests/test_resume.py (unit stores) and
tests/test_export.py (saved models, npz exports).
"""
import dataclasses
import importlib
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import pipeline, validate
from rapq_jax import config as config_lib
from rapq_jax import convert, integrity

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "experiments" / "checkpoints" / "fmnist_resnet.npz"


def fmnist_config():
  return importlib.import_module("experiments.configs.fmnist_resnet").get_config()


def _set(config, field: str, value):
  node, *path = field.split(".")
  if path:
    config[node][path[0]] = value
  else:
    config[node] = value
  return config


# ------------------------------------------------------------------ config fields

@pytest.mark.parametrize("method, field, value, message", [
    ("naive", "ptq.scale_p", -1, r"scale_p = -1.0: expected a finite number > 0"),
    ("naive", "ptq.scale_p", math.nan, "scale_p = nan: expected a finite number > 0"),
    ("rapq", "ptq.loss_p_coef", math.nan, "loss_p_coef = nan: expected a finite number >= 0"),
    ("rapq", "ptq.lr_w", 0.0, "lr_w = 0.0: expected a finite number > 0"),
    ("rapq", "ptq.b_end", math.inf, "b_end = inf: expected a finite number > 0"),
    ("rapq", "ptq.warmup", 1.5, r"warmup = 1.5: expected a finite number >= 0 and <= 1"),
    ("naive", "eval_batch_size", 0, "config.eval_batch_size = 0: expected an integer >= 1"),
    ("naive", "calibration_size", 0, "config.calibration_size = 0: expected an integer >= 1"),
    ("naive", "test_size", 0, r"config.test_size = 0: expected an integer >= 1 \(or None"),
    ("rapq", "calibration_size", 16, r"config.calibration_size = 16: fewer images than one "
                                     r"reconstruction batch \(config.batch_size = 32\)"),
    ("rapq_search", "calibration_size", 256, r"config.calibration_size = 256: search_samples = 256 "
                                      r"held out of 256 calibration images leaves 0"),
    ("naive", "model", "resnet9000", "config.model = 'resnet9000': expected one of"),
    ("naive", "dataset.mean", (0.1, 0.2),
     r"config.dataset.mean = \(0.1, 0.2\): expected 1 finite number\(s\)"),
    ("naive", "dataset.std", (0.0,), r"config.dataset.std = \(0.0,\): a zero"),
    ("naive", "checkpoint", "", "config.checkpoint = '': expected a checkpoint path"),
])
def test_bad_config_fields_are_named_before_any_data_is_read(method, field, value, message,
                                                              monkeypatch):
  config = _set(fmnist_config(), field, value)
  monkeypatch.setattr(validate.pipeline, "load_data", lambda c: pytest.fail("data read"))
  with pytest.raises(validate.UserError, match=message):
    validate.prepare(config, [("fp", config), (method, config)])


def test_config_ptq_fields_refuse_a_value_of_another_type():
  """``config.ptq`` fields are typed placeholders: a string for a float is refused when it
  is set, naming the field, before any run starts."""
  with pytest.raises(TypeError, match="loss_p_fixed"):
    _set(fmnist_config(), "ptq.loss_p_fixed", "two")


def test_library_config_checks_every_float_field():
  for name in config_lib.FLOAT_RANGES:
    with pytest.raises(ValueError, match=rf"^{name} = nan: expected a finite number"):
      config_lib.PTQConfig(**{name: math.nan})
  with pytest.raises(ValueError, match="reconstruct = 1: expected True or False"):
    config_lib.for_method("rapq", reconstruct=1)


# ------------------------------------------------------------------ data and checkpoint

@pytest.fixture
def npz_config(tmp_path):
  """The Fashion-MNIST ResNet config on a 40/10-image npz dataset (28x28x1)."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("test", 10)):
    np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (n, 28, 28, 1), np.uint8),
             labels=rng.integers(0, 10, n))
  config = fmnist_config()
  config.dataset.source = "npz"
  config.dataset.train, config.dataset.test = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
  config.calibration_size, config.checkpoint = 8, str(CHECKPOINT)
  return config


def _checkpoint_with(tmp_path, key: str, index, value) -> str:
  with np.load(CHECKPOINT) as f:
    arrays = {k: f[k] for k in f.files}
  arrays[key] = arrays[key].copy()
  arrays[key][index] = value
  np.savez(tmp_path / "bad.npz", **arrays)
  return str(tmp_path / "bad.npz")


def test_good_config_prepares_its_data(npz_config):
  data = validate.prepare(npz_config, [("fp", npz_config), ("naive", npz_config)])
  assert data.calib_images.shape == (8, 28, 28, 1) and data.test_images.shape == (10, 28, 28, 1)


def test_bad_data_and_checkpoints_are_named(npz_config, tmp_path):
  """Sizes against the data, a missing checkpoint, NaN and Inf weights (tensor and index),
  the model's image shape: all before anything is written."""
  key = "layer1.0.conv1.weight"
  cases = [
      (dict(calibration_size=41), r"config.calibration_size = 41: calibration size n=41 must "
                                  r"lie in 1..40"),
      (dict(test_size=11), r"config.test_size = 11: expected 1..10"),
      (dict(checkpoint=str(tmp_path / "nope.npz")), r"checkpoint not found: .*nope.npz"),
      (dict(checkpoint=_checkpoint_with(tmp_path, key, (2, 0, 1, 1), np.nan)),
       rf"tensor '{key}' \(shape \(\d+, \d+, 3, 3\)\) has 1 non-finite value\(s\), the first nan "
       r"at index \(2, 0, 1, 1\)"),
  ]
  for fields, message in cases:
    config = npz_config.copy_and_resolve_references()
    for k, v in fields.items():
      config[k] = v
    with pytest.raises(validate.UserError, match=message):
      validate.prepare(config, [("fp", config)])
  inf = npz_config.copy_and_resolve_references()
  inf.checkpoint = _checkpoint_with(tmp_path, key, (0, 0, 0, 0), -np.inf)
  with pytest.raises(validate.UserError, match=rf"'{key}'.*the first -inf at index \(0, 0, 0, 0\)"):
    validate.prepare(inf, [("fp", inf)])
  cifar = npz_config.copy_and_resolve_references()
  cifar.model, cifar.dataset.mean, cifar.dataset.std = "cifar_resnet20", (0.5,) * 3, (0.2,) * 3
  with pytest.raises(validate.UserError, match=r"shape \(28, 28, 1\); config.model = "
                                               r"'cifar_resnet20' takes 3 channel\(s\)"):
    validate.prepare(cifar, [("fp", cifar)])


def test_float_data_with_a_nan_names_the_image():
  images = np.zeros((3, 28, 28, 1), np.float32)
  images[2, 4, 5, 0] = np.nan
  labels = np.zeros(3, np.int32)
  data = pipeline.Data(images, labels, images[:2], labels[:2], lambda x: np.asarray(x, np.float32))
  with pytest.raises(validate.UserError, match=r"preprocessed calibration images \[0:\]: image 2 "
                                               r"has a non-finite value nan at pixel \(h=4, w=5"):
    validate.check_data(fmnist_config(), data)
  validate.check_data(fmnist_config(), dataclasses.replace(data, calib_images=images[:2],
                                                          calib_labels=labels[:2]))


def test_load_pretrained_names_a_non_finite_weight(tmp_path):
  path = _checkpoint_with(tmp_path, "linear.bias", 3, np.nan)
  with pytest.raises(convert.CheckpointError, match=r"'linear.bias' \(shape \(10,\)\).*index \(3,\)"):
    convert.load_pretrained(path, "fmnist_resnet")


# ------------------------------------------------------------------ images and trees

def _nan_images():
  images = np.zeros((4, 8, 8, 3), np.float32)
  images[2, 5, 1, 0], images[3, 0, 0, 0] = np.nan, np.inf
  return images


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.uint8), r"integer pixels \(dtype uint8\); expected preprocessed"),
    (np.zeros((2, 8, 8, 3), np.int32), r"integer pixels \(dtype int32\)"),
    (np.zeros((2, 3, 8, 8), np.float32), r"shape\[1\] = 3 looks like channels-first \(NCHW\)"),
    (np.zeros((0, 8, 8, 3), np.float32), "holds no image"),
    (np.zeros((8, 8, 3), np.float32), "rank-4"),
    (_nan_images(), r"image 2 has a non-finite value nan at pixel \(h=5, w=1, c=0\); 2 image"),
])
def test_check_images_names_what_is_wrong(images, message):
  with pytest.raises(ValueError, match=message):
    integrity.check_images(images, "images", channels=3)


def test_check_finite_names_tensor_and_index():
  tree = {"params": {"a": {"kernel": np.ones((2, 3))}, "b": {"bias": np.array([0.0, np.inf])}}}
  with pytest.raises(ValueError, match=r"w: tensor 'params/b/bias' \(shape \(2,\)\) has 1 "
                                       r"non-finite value\(s\), the first inf at index \(1,\)"):
    integrity.check_finite(tree, "w")
  integrity.check_finite({"ok": np.ones(3), "ints": np.arange(3)}, "w")


def test_verify_names_the_damaged_leaf():
  tree = {"a": np.arange(4, dtype=np.int32), "b": {"c": np.ones(2, np.float32)}}
  sums = integrity.digests(tree)
  assert list(sums) == ["a", "b/c"]
  integrity.verify(tree, sums, "f")
  bad = {"a": tree["a"], "b": {"c": np.array([1.0, 1.0000001], np.float32)}}
  with pytest.raises(integrity.IntegrityError, match=r"^f: checksum mismatch of b/c"):
    integrity.verify(bad, sums, "f")
  retyped = {"a": tree["a"].astype(np.int64), "b": tree["b"]}
  with pytest.raises(integrity.IntegrityError, match="checksum mismatch of a "):
    integrity.verify(retyped, sums, "f")
  with pytest.raises(integrity.IntegrityError, match=r"\['b/c'\] missing"):
    integrity.verify({"a": tree["a"]}, sums, "f")


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, mask, mode):
  old = os.umask(mask)
  try:
    integrity.atomic_write(tmp_path / "a.json", "{}")
    integrity.atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"))
  finally:
    os.umask(old)
  assert (tmp_path / "a.json").read_text() == "{}"
  assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.bin")] == [mode, mode]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
  target = tmp_path / "results.json"
  integrity.atomic_write(target, "old")

  class Boom:  # not str/bytes-writable: the write raises mid-way
    pass

  with pytest.raises(TypeError):
    integrity.atomic_write(target, Boom())
  assert target.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _hold_lock(directory) -> subprocess.Popen:
  """Another process holding ``directory``'s lock until killed (numpy only, no JAX)."""
  code = ("import sys, time; from rapq_jax import integrity; "
          "integrity.DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); "
          "time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.stdout.readline().strip() == "held"
  return proc


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()


def test_directory_lock_names_the_holder_and_survives_its_death(tmp_path):
  holder = _hold_lock(tmp_path)
  try:
    with pytest.raises(integrity.LockedError, match=rf"in use by another run \(process "
                                                    rf"{holder.pid} holds .*\.lock\)"):
      integrity.DirectoryLock(tmp_path).acquire()
  finally:
    _kill(holder)
  assert (tmp_path / ".lock").read_text().strip() == str(holder.pid)   # stale, not blocking
  with integrity.DirectoryLock(tmp_path):
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
  with integrity.DirectoryLock(tmp_path):        # released on exit
    pass


# ------------------------------------------------------------------ python -m experiments.run

def test_damaged_result_record_is_computed_again_never_reported(tmp_path, monkeypatch, capsys):
  from experiments import job  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setitem(job.METHODS, "fp", lambda config, data, reference_logits: calls.append(
      1) or dict(top1=81.25, top5=95.5, n=200, wall_seconds=1.0))
  args = (tmp_path, "fp", None, None, None, None, lambda: None)
  first = job.run_once(*args)
  assert job.run_once(*args) == first and len(calls) == 1
  path = tmp_path / "results" / "fp.json"
  path.write_text(path.read_text().replace("81.25", "91.25"))
  assert job.run_once(*args) == first and len(calls) == 2
  assert "fp.json: checksum mismatch (or none): the file is damaged; computing it again" in (
      capsys.readouterr().out)



def test_each_result_says_the_commit_that_computed_it(tmp_path, monkeypatch):
  """A run resumed at a later commit loads results computed at the earlier one: each
  record keeps the commit it was computed at, and results.json's ``git`` is theirs when
  they agree, else the later start's."""
  from experiments import job  # pylint: disable=import-outside-toplevel
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(job.METHODS, "fp", lambda config, data, reference_logits: dict(
      top1=81.25, top5=95.5, n=200, wall_seconds=1.0))
  old, new = dict(commit="a" * 40, dirty=False), dict(commit="b" * 40, dirty=True)
  first = job.run_once(tmp_path, "fp", None, None, None, None, lambda: None, old)
  assert first["git"] == old
  resumed = job.run_once(tmp_path, "fp", None, None, None, None, lambda: None, new)
  assert resumed["git"] == old                      # loaded, not computed again
  monkeypatch.setattr(job.report, "plot_top1", lambda *a: None)
  monkeypatch.setattr(job.report, "plot_exponents", lambda *a: None)
  monkeypatch.setattr(job.report, "plot_losses", lambda *a: None)
  config = base.get_base_config()
  for results, expected in (([resumed], old), ([resumed, {**resumed, "git": new}], new)):
    job.write_outputs(tmp_path, config, results, dict(git=new))
    assert json.loads((tmp_path / "results.json").read_text())["git"] == expected


def test_job_drops_the_programs_of_each_quantized_run_before_the_next(tmp_path, monkeypatch):
  """The compiled programs of a quantized run are its method's and bit widths' own: the
  job drops them after it (not after fp, nothing after the last run), so they do not add
  up in memory over a job's runs; dropping empties every jitted function's cache."""
  from experiments import job  # pylint: disable=import-outside-toplevel
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  f = jax.jit(lambda x: x + 1)
  f(1.0)
  assert f._cache_size() == 1   # pylint: disable=protected-access
  job.release_compiled_programs()
  assert f._cache_size() == 0   # pylint: disable=protected-access
  events = []
  monkeypatch.setattr(job.validate, "prepare", lambda config, runs: None)
  monkeypatch.setattr(job, "run_once", lambda workdir, method, wbits, *rest: events.append(
      f"{method}{wbits or ''}") or {})
  monkeypatch.setattr(job, "format_result", lambda record: "")
  monkeypatch.setattr(job, "write_outputs", lambda *args: None)
  monkeypatch.setattr(job, "release_compiled_programs", lambda: events.append("drop"))
  job.run(base.get_base_config(), ("naive", "rapq"), [(4, 4), (2, 4)], tmp_path)
  assert events == ["fp", "naive4", "drop", "naive2", "drop", "rapq4", "drop", "rapq2"]


def _run(workdir, *args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", "--methods", "fp", "--config.test_size=200",
       "--config.calibration_size=64", f"--workdir={workdir}", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}, check=False)


def test_run_checks_before_writing_locks_and_writes_readable_files(fashion_mnist_dir, tmp_path):
  """A bad field: one line naming it, no traceback, no directory; a locked directory:
  refused naming the holder; the corrected command then runs in the same directory,
  past the stale lock of a killed process, and its files follow the umask."""
  workdir = tmp_path / "run"
  data_dir = f"--config.dataset.data_dir={fashion_mnist_dir}"
  bad = _run(workdir, data_dir, "--config.eval_batch_size=0")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "config.eval_batch_size = 0: expected an integer >= 1" in bad.stderr
  assert not workdir.exists()
  workdir.mkdir()
  holder = _hold_lock(workdir)
  try:
    locked = _run(workdir, data_dir)
  finally:
    _kill(holder)
  assert locked.returncode != 0 and "Traceback" not in locked.stderr
  assert f"in use by another run (process {holder.pid} holds" in locked.stderr
  assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
  old = os.umask(0o022)          # inherited by the run
  try:
    ok = _run(workdir, data_dir)
  finally:
    os.umask(old)
  assert ok.returncode == 0, ok.stderr[-3000:]
  for name in ("config.json", "results.json", "results.md", "results/fp.json"):
    assert (workdir / name).stat().st_mode & 0o777 == 0o644, name
