"""ResNet-18 on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint).

Set --config.dataset.manual_dir to the directory with the ILSVRC2012 tars.
"""
import ml_collections

from experiments import data
from experiments.configs import base

BRECQ_RELEASE = "https://github.com/yhhhli/BRECQ/releases/download/v1.0/"


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.model = "resnet18"
  config.checkpoint = BRECQ_RELEASE + "resnet18_imagenet.pth.tar"
  config.checkpoint_scheme = "torchvision"
  config.dataset.source = "tfds"
  config.dataset.name = "imagenet2012"
  # TFDS stores examples in hashed-key order, so a prefix is a random subset.
  config.dataset.train = "train[:10000]"
  config.dataset.test = "validation"
  config.dataset.image_size = 224
  config.dataset.mean = data.IMAGENET_MEAN
  config.dataset.std = data.IMAGENET_STD
  config.weight_iters = 20000
  return config


def brecq_zoo_config(model: str, checkpoint_file: str) -> ml_collections.ConfigDict:
  """This config for another model of BRECQ's zoo: its release checkpoint, key scheme
  'brecq'."""
  config = get_config()
  config.model = model
  config.checkpoint = BRECQ_RELEASE + checkpoint_file
  config.checkpoint_scheme = "brecq"
  return config
