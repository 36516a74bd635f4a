"""Experiment configs: one ml_collections file per model and dataset, each with `get_config()`."""
import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def available() -> list[str]:
  """Bare names of the config files (without base.py), sorted."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def config_path(name: str) -> str:
  """Path of the config file for a bare name such as 'cifar10_resnet20'."""
  if name not in available():
    raise ValueError(f"unknown config {name!r}; available: {', '.join(available())}")
  return str(CONFIG_DIR / f"{name}.py")
