"""Defaults shared by every experiment config; the per-model files override them.

Paths may start with `$RAPQ_SHARED_DIR`, which `experiments.run` replaces by
`--shared_dir` (default: the RAPQ_SHARED_DIR environment variable).
"""
import dataclasses

import ml_collections
from ml_collections import config_dict

from rapq_jax.config import PTQConfig

# PTQConfig fields set from the top-level fields of the same names, not from config.ptq.
TOP_LEVEL = ("wbits", "abits", "first_last_bits", "weight_iters", "act_iters", "batch_size",
             "seed")


def get_base_config() -> ml_collections.ConfigDict:
  """Shared defaults: calibration, bit widths, reconstruction schedule."""
  config = ml_collections.ConfigDict()
  config.seed = 1005

  config.model = ""  # rapq_jax.models.get_model name
  config.checkpoint = ""  # .npz/.th/.pth path or URL, read by rapq_jax.convert.load_pretrained
  config.checkpoint_scheme = "torchvision"  # state-dict naming scheme of the checkpoint

  config.dataset = ml_collections.ConfigDict()
  config.dataset.source = ""  # 'npz' | 'fashion_mnist' | 'tfds'
  config.dataset.name = ""  # TFDS name (source 'tfds')
  config.dataset.train = ""  # calibration pool: .npz path or split
  config.dataset.test = ""  # evaluation set: .npz path or split
  config.dataset.data_dir = config_dict.placeholder(str)  # IDX directory or TFDS data_dir
  config.dataset.manual_dir = config_dict.placeholder(str)  # TFDS manual_dir (imagenet2012)
  config.dataset.image_size = config_dict.placeholder(int)  # resize + center-crop size (TFDS)
  config.dataset.mean = config_dict.placeholder(tuple)  # per channel, applied after x / 255
  config.dataset.std = config_dict.placeholder(tuple)

  # float32 conv/matmul precision (jax_default_matmul_precision). On GPUs JAX's default
  # runs float32 convs as TF32, which cost RAPQ ResNet-20 1.9 (W4A4) and 0.6 (W2A4) top-1
  # points on an H100 (docs/RESULTS.md); CPUs compute float32 either way.
  config.matmul_precision = "highest"
  config.eval_batch_size = 256
  config.test_size = config_dict.placeholder(int)  # evaluate on the first N test images only
  config.calibration_size = 1024

  config.wbits = 4
  config.abits = 4
  config.first_last_bits = 8  # first conv and last linear layer
  config.weight_iters = 2000  # reconstruction iterations per block, weight rounding
  config.act_iters = 500  # activation step-size iterations per block
  config.batch_size = 32  # reconstruction batch
  # Every other rapq_jax.config.PTQConfig field, unset (None: the method's preset, else
  # the PTQConfig default, applies). A field given here or as e.g.
  # --config.ptq.search=after wins over the method's preset (experiments.methods).
  config.ptq = ml_collections.ConfigDict(
      {f.name: config_dict.placeholder(type(f.default)) for f in dataclasses.fields(PTQConfig)
       if f.name not in TOP_LEVEL})
  return config
