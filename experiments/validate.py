"""Everything a run needs, checked before its run directory is created or bound.

``prepare(config, runs)`` checks the config's fields (every PTQConfig of ``runs``, the
sizes, the model name, the preprocessing), loads the data and the checkpoint and checks
them (sizes against the data, finite weights, the model's input channels), and returns
the loaded data. A problem is a ``UserError`` whose one-line message names the field or
file and its bad value: the command line is wrong, not the code.
"""
import math

import ml_collections
import numpy as np

from experiments import methods, pipeline
from rapq_jax import integrity, models, ptq


CHECK_BATCH = 1024


class UserError(ValueError):
  """A config, data or checkpoint problem the user can fix by changing the command."""


def _positive_int(config, field: str, *, optional: bool = False) -> None:
  value = config[field]
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f"config.{field} = {value!r}: expected an integer >= 1"
                    + (" (or None for all)" if optional else ""))


def check_config(config: ml_collections.ConfigDict, runs) -> None:
  """The config's own fields and the PTQConfig of every ``(method, config)`` in ``runs``."""
  # The config's own fields must be valid even where --bits replaces them.
  cfgs = []
  for method, method_config in [("naive", config), *runs]:
    if method in methods.QUANT_METHODS:
      try:
        cfgs.append(methods.ptq_config(method_config, method))
      except ValueError as err:
        raise UserError(str(err)) from None
  _positive_int(config, "eval_batch_size")
  _positive_int(config, "calibration_size")
  for cfg in cfgs[1:]:
    if cfg.reconstruct and config.calibration_size < cfg.batch_size:
      raise UserError(f"config.calibration_size = {config.calibration_size}: fewer images than "
                      f"one reconstruction batch (config.batch_size = {cfg.batch_size})")
    try:
      ptq.check_calibration_size(config.calibration_size, cfg)
    except ValueError as err:
      raise UserError(f"config.calibration_size = {config.calibration_size}: {err}") from None
  _positive_int(config, "test_size", optional=True)
  if config.model not in models.MODEL_NAMES:
    raise UserError(f"config.model = {config.model!r}: expected one of "
                    f"{', '.join(models.MODEL_NAMES)}")
  if not isinstance(config.checkpoint, str) or not config.checkpoint:
    raise UserError(f"config.checkpoint = {config.checkpoint!r}: expected a checkpoint path or URL")
  channels = models.input_shape(config.model)[2]
  for field in ("mean", "std"):
    value = config.dataset[field]
    if (not isinstance(value, (tuple, list)) or len(value) != channels
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
      raise UserError(f"config.dataset.{field} = {value!r}: expected {channels} finite "
                      f"number(s), one per input channel of {config.model!r}")
  if any(v == 0 for v in config.dataset.std):
    raise UserError(f"config.dataset.std = {config.dataset.std!r}: a zero divides by zero")


def check_data(config: ml_collections.ConfigDict, data: pipeline.Data) -> None:
  """Image channels against the model; images finite after preprocessing (uint8 pixels
  are, with the finite, nonzero mean/std ``check_config`` requires; other dtypes are
  checked image by image, naming the first bad one)."""
  channels = models.input_shape(config.model)[2]
  for what, images in (("calibration", data.calib_images), ("test", data.test_images)):
    if images.shape[-1] != channels:
      raise UserError(f"{what} images of config.dataset have shape {images.shape[1:]}; "
                      f"config.model = {config.model!r} takes {channels} channel(s)")
    if images.dtype != np.uint8:
      for start in range(0, len(images), CHECK_BATCH):
        try:
          integrity.check_images(data.preprocess(images[start:start + CHECK_BATCH]),
                                 f"preprocessed {what} images [{start}:]")
        except ValueError as err:
          raise UserError(str(err)) from None


def prepare(config: ml_collections.ConfigDict, runs) -> pipeline.Data:
  """Checks the config, data and checkpoint (see the module doc); returns the data."""
  check_config(config, runs)
  try:
    data = pipeline.load_data(config)
  except (ValueError, OSError) as err:
    raise UserError(str(err)) from None  # the loaders name the file and the field
  check_data(config, data)
  try:
    pipeline.load_model(config)          # reads the file and checks keys, shapes, values
  except (ValueError, OSError, ImportError) as err:
    raise UserError(f"config.checkpoint = {config.checkpoint!r}: {err}") from None
  return data
