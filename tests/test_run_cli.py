"""Specification of `python -m experiments.run`: flags, configs and the fp method."""
import importlib
import json
import os
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

import compile_flags

from experiments import configs
from experiments import pipeline
from experiments import run
from rapq_jax.models import MODEL_NAMES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=120, **env):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False,
                        env={**os.environ, **env})


# --bits and --methods

@pytest.mark.parametrize("text,expected", [
    ("4/4", ((4, 4),)),
    ("4/4,2/4", ((4, 4), (2, 4))),
    ("2/8, 8/2", ((2, 8), (8, 2))),
])
def test_parse_bits(text, expected):
  assert run.parse_bits(text) == expected


@pytest.mark.parametrize("text,token", [
    ("4/9", "4/9"), ("1/4", "1/4"), ("4", "4"), ("4/4/4", "4/4/4"), ("a/4", "a/4"),
    ("4/-4", "4/-4"), ("", ""), ("4/4,", ""),
])
def test_parse_bits_rejects(text, token):
  with pytest.raises(ValueError, match=rf"bad bit-width pair '{re.escape(token)}'.*2\.\.8"):
    run.parse_bits(text)


def test_parse_methods():
  assert run.parse_methods("fp") == ("fp",)


@pytest.mark.parametrize("text,bad", [("fp,foo", "foo"), ("", ""), ("FP", "FP")])
def test_parse_methods_rejects_unknown(text, bad):
  with pytest.raises(ValueError, match=rf"unknown method '{bad}'; accepted: .*fp"):
    run.parse_methods(text)


@pytest.mark.parametrize("text,expected", [
    ("auto", {}),
    ("10.0.0.1:1234,2,0", dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)),
    ("host-a:99, 4, 3", dict(coordinator_address="host-a:99", num_processes=4, process_id=3)),
])
def test_parse_distributed(text, expected):
  assert run.parse_distributed(text) == expected


@pytest.mark.parametrize("text", ["", "yes", "host:1234", "host,2,0", "host:1234,2,2",
                                  "host:1234,2,-1", "host:1234,2,0,1"])
def test_parse_distributed_rejects(text):
  with pytest.raises(ValueError, match=rf"bad --distributed '{re.escape(text)}'.*PROCESS_ID"):
    run.parse_distributed(text)


# Configs

@pytest.mark.parametrize("name", configs.available())
def test_every_config_loads_with_required_fields(name):
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  assert config.model in MODEL_NAMES
  assert config.dataset.source in ("npz", "fashion_mnist", "tfds")
  assert len(config.dataset.mean) == len(config.dataset.std)
  assert config.calibration_size == 1024 and config.seed == 1005
  assert (config.wbits, config.abits, config.first_last_bits) == (4, 4, 8)


def test_expected_configs_exist():
  assert {"cifar10_resnet20", "cifar10_resnet56", "imagenet_resnet18",
          "imagenet_mobilenetv2"} <= set(configs.available())


@pytest.mark.parametrize("argv,expected", [
    (["--config", "cifar10_resnet20"], ["--config", configs.config_path("cifar10_resnet20")]),
    (["--config=cifar10_resnet56"], [f"--config={configs.config_path('cifar10_resnet56')}"]),
    (["--config", __file__, "--config.seed=3"], ["--config", __file__, "--config.seed=3"]),
])
def test_resolve_config_argv(argv, expected):
  assert run.resolve_config_argv(["run", *argv]) == ["run", *expected]


def test_config_path_lists_available_names():
  with pytest.raises(ValueError, match=r"unknown config 'nope'; available: .*cifar10_resnet20"):
    configs.config_path("nope")


# Pipeline

def cifar10_config():
  return importlib.import_module("experiments.configs.cifar10_resnet20").get_config()


def test_resolve_paths_substitutes_shared_dir_in_a_copy():
  config = cifar10_config()
  resolved = pipeline.resolve_paths(config, "/data/shared")
  assert resolved.checkpoint == "/data/shared/models/cifar10_resnet20.npz"
  assert resolved.dataset.test == "/data/shared/data/cifar10_jpeg/test.npz"
  assert config.checkpoint == "$RAPQ_SHARED_DIR/models/cifar10_resnet20.npz"


def test_load_data_samples_calibration_set_and_normalizes(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in [("train", 20), ("test", 7)]:
    np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, n))
  config = cifar10_config()
  config.dataset.train, config.dataset.test = str(tmp_path / "train.npz"), str(tmp_path / "test.npz")
  config.calibration_size = 5
  data = pipeline.load_data(config)
  chex.assert_shape([data.calib_images, data.calib_labels], [(5, 8, 8, 3), (5,)])
  chex.assert_shape([data.test_images, data.test_labels], [(7, 8, 8, 3), (7,)])
  chex.assert_type(data.preprocess(data.test_images), np.float32)


def test_load_data_rejects_unknown_source():
  config = cifar10_config()
  config.dataset.source = "csv"
  with pytest.raises(ValueError, match=r"'npz', 'fashion_mnist' or 'tfds'; got 'csv'"):
    pipeline.load_data(config)


# Command line errors

@pytest.mark.parametrize("args,message", [
    (["--bits", "4/4,2/9"], r"--bits=4/4,2/9: bad bit-width pair '2/9'"),
    (["--methods", "fp,foo"], r"unknown method 'foo'; accepted: fp"),
    (["--config", "nope"], r"unknown config 'nope'; available: .*cifar10_resnet56"),
])
def test_cli_rejects_bad_flags(args, message):
  proc = run_cli(*args)
  assert proc.returncode != 0
  assert re.search(message, proc.stderr), proc.stderr


# The persistent compilation cache

@pytest.mark.parametrize("flag, env, expected", [
    ("/c/flag", {"JAX_COMPILATION_CACHE_DIR": "/c/env"}, "/c/flag"),
    ("", {"JAX_COMPILATION_CACHE_DIR": "/c/env"}, None),
    (None, {"JAX_COMPILATION_CACHE_DIR": "/c/env", "XDG_CACHE_HOME": "/x"}, "/c/env"),
    (None, {"XDG_CACHE_HOME": "/x"}, "/x/rapq_jax/xla"),
    (None, {"HOME": "/home/u"}, "/home/u/.cache/rapq_jax/xla"),
])
def test_compilation_cache_dir_flag_then_jax_env_then_user_cache(flag, env, expected,
                                                                 monkeypatch):
  for name in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert run.compilation_cache_dir(flag) == expected


@pytest.mark.slow(seconds=12)
def test_a_second_run_loads_its_programs_from_the_compilation_cache(tmp_path):
  cache = tmp_path / "xla"
  args = ("--methods", "fp", "--config.test_size=200", f"--compilation_cache={cache}")
  first = run_cli(*args, "--workdir", str(tmp_path / "a"))
  assert first.returncode == 0, first.stderr
  assert any(cache.iterdir()), "nothing was written to the compilation cache"
  second = run_cli(*args, "--workdir", str(tmp_path / "b"), JAX_LOG_COMPILES="1")
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit" in second.stderr
  first, again = (json.loads((tmp_path / d / "results.json").read_text())["results"][0]
                  for d in "ab")
  assert first["top1"] == again["top1"]
  assert first["compilation_cache"]["hits"] == 0 < first["compilation_cache"]["misses"]
  assert again["compilation_cache"] == {"hits": first["compilation_cache"]["misses"],
                                        "misses": 0}


# End to end (shared CIFAR-10 data and checkpoint)

@pytest.mark.shared
@pytest.mark.slow(seconds=18)
def test_fp_cifar10_resnet20_top1(shared_dir, tmp_path):
  """The whole test split through the CLI, compiled for a long run (10000 images:
  tests/compile_flags.py)."""
  proc = run_cli("--config", "cifar10_resnet20", "--methods", "fp", "--shared_dir", str(shared_dir),
                 "--workdir", str(tmp_path), "--config.eval_batch_size=500", timeout=600,
                 XLA_FLAGS=compile_flags.for_long_run(os.environ.get("XLA_FLAGS", "")))
  assert proc.returncode == 0, proc.stderr
  top1 = float(re.search(r"^fp\s+FP32\s+top-1 ([\d.]+) %", proc.stdout, re.M).group(1))
  assert top1 == pytest.approx(81.03, abs=0.05)
  [result] = json.loads((tmp_path / "results.json").read_text())["results"]
  assert result["method"] == "fp" and result["n"] == 10000
  assert json.loads((tmp_path / "config.json").read_text())["eval_batch_size"] == 500
