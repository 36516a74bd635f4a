"""Experiment plumbing: a config's data, pretrained model and test accuracy."""
import copy
import dataclasses
import functools
import os
import pathlib
import string
import urllib.parse
from typing import Callable

import flax.linen as nn
import ml_collections
import numpy as np

from experiments import data as data_lib
from rapq_jax import convert
from rapq_jax import evaluate as evaluate_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Data:
  """Calibration sample and test split (uint8 NHWC, int32 labels) with their preprocessing."""
  calib_images: np.ndarray  # uint8 [config.calibration_size, H, W, C]
  calib_labels: np.ndarray  # int32 [config.calibration_size]
  test_images: np.ndarray  # uint8 [N, H, W, C]
  test_labels: np.ndarray  # int32 [N]
  preprocess: Callable[[np.ndarray], np.ndarray]  # uint8 batch -> float32 model input


def resolve_paths(config: ml_collections.ConfigDict, shared_dir: str) -> ml_collections.ConfigDict:
  """Copy of `config` with `$RAPQ_SHARED_DIR` in every string field replaced by `shared_dir`."""
  config = copy.deepcopy(config)

  def resolve(node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        resolve(value)
      elif isinstance(value, str):
        node[key] = string.Template(value).safe_substitute(RAPQ_SHARED_DIR=shared_dir)

  resolve(config)
  return config


def _load_split(dataset: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels int32 [N]) of dataset[split] ('train' or 'test')."""
  if dataset.source == "npz":
    path = location(dataset[split])
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"config.dataset.{split}: npz dataset {path} not found; give an .npz with 'images' "
          "uint8 [N, H, W, C] and 'labels' (--config.dataset.train/test=PATH), or another "
          "source: --config.dataset.source=fashion_mnist (Debian's IDX files) or tfds")
    return data_lib.load_npz(path)
  if dataset.source == "fashion_mnist":
    root = dataset.data_dir or data_lib.FASHION_MNIST_DIR
    return data_lib.load_fashion_mnist(dataset[split], root)
  if dataset.source == "tfds":
    return data_lib.load_tfds(dataset.name, dataset[split], data_dir=dataset.data_dir,
                              manual_dir=dataset.manual_dir, image_size=dataset.image_size)
  raise ValueError(
      f"config.dataset.source must be 'npz', 'fashion_mnist' or 'tfds'; got {dataset.source!r}")


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Test split, and a calibration sample (config.calibration_size, config.seed) of the train split."""
  train_images, train_labels = _load_split(config.dataset, "train")
  try:
    calib_images, calib_labels = data_lib.calibration_sample(
        train_images, train_labels, config.calibration_size, config.seed)
  except ValueError as err:
    raise ValueError(f"config.calibration_size = {config.calibration_size!r}: {err}") from None
  test_images, test_labels = _load_split(config.dataset, "test")
  if config.test_size is not None:
    if not 0 < config.test_size <= len(test_images):
      raise ValueError(f"config.test_size = {config.test_size}: expected 1..{len(test_images)}")
    test_images, test_labels = test_images[:config.test_size], test_labels[:config.test_size]
  preprocess = functools.partial(
      data_lib.normalize, mean=config.dataset.mean, std=config.dataset.std)
  return Data(calib_images, calib_labels, test_images, test_labels, preprocess)


def location(path: str) -> str:
  """`path`, or the repository root joined with it for a relative path that is no file here.

  Committed checkpoints and data are named relative to the repository root
  (experiments/checkpoints/...), so jobs find them from any working directory and
  from an installed package (which holds experiments/checkpoints as package data).
  """
  if (urllib.parse.urlparse(path).scheme in convert.URL_SCHEMES
      or os.path.isabs(path) or os.path.isfile(path)):
    return path
  return str(REPO_ROOT / path)


def load_model(config: ml_collections.ConfigDict) -> tuple[nn.Module, dict]:
  """(model, {'params', 'batch_stats'}) from config.checkpoint (see `location`)."""
  return convert.load_pretrained(location(config.checkpoint), config.model,
                                 scheme=config.checkpoint_scheme)


def model_logits(model: nn.Module, variables: dict, data: Data,
                 config: ml_collections.ConfigDict, *, desc: str,
                 progress: bool = True) -> np.ndarray:
  """Logits [N, num_classes] of `model` in eval mode on the test split."""
  return evaluate_lib.predict(
      lambda x: model.apply(variables, x, train=False), data.test_images,
      batch_size=config.eval_batch_size, preprocess=data.preprocess, desc=desc,
      progress=progress)


def fp_logits(config: ml_collections.ConfigDict, data: Data, *, progress: bool = True) -> np.ndarray:
  """Logits of config's pretrained model on the test split: its FP figures, and the
  reference of each quantized model's agreement and KL."""
  model, variables = load_model(config)
  return model_logits(model, variables, data, config, desc="fp", progress=progress)
