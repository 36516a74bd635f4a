"""Experiment configs: one ml_collections file per model and dataset, each with `get_config()`.

`pretrain_<name>.py` files configure `experiments.pretrain` (training a checkpoint);
every other file configures a quantization job of `experiments.run`.
"""
import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
PRETRAIN_PREFIX = "pretrain_"


def available() -> list[str]:
  """Bare names of the quantization config files (without base.py), sorted."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                if p.stem not in ("__init__", "base") and not p.stem.startswith(PRETRAIN_PREFIX))


def config_path(name: str) -> str:
  """Path of the config file for a bare name such as 'cifar10_resnet20'."""
  if name not in available():
    raise ValueError(f"unknown config {name!r}; available: {', '.join(available())}")
  return str(CONFIG_DIR / f"{name}.py")


def available_pretrain() -> list[str]:
  """Bare names of the pretraining configs ('fmnist_resnet' for pretrain_fmnist_resnet.py), sorted."""
  return sorted(p.stem.removeprefix(PRETRAIN_PREFIX)
                for p in CONFIG_DIR.glob(f"{PRETRAIN_PREFIX}*.py"))


def pretrain_config_path(name: str) -> str:
  """Path of the pretraining config file for a bare name such as 'fmnist_resnet'."""
  if name not in available_pretrain():
    raise ValueError(
        f"unknown pretraining config {name!r}; available: {', '.join(available_pretrain())}")
  return str(CONFIG_DIR / f"{PRETRAIN_PREFIX}{name}.py")


def resolve_config_argv(argv: list[str], resolve) -> list[str]:
  """argv with the value of `--config NAME` / `--config=NAME` replaced by `resolve(NAME)`
  (a config file path), so ml_collections' config_flags can load bare names."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition("=")
    if flag not in ("--config", "-config"):
      continue
    if eq:
      argv[i] = f"{flag}={resolve(value)}"
    elif i + 1 < len(argv):
      argv[i + 1] = resolve(argv[i + 1])
  return argv
