"""Pretraining fmnist_resnet (ResNet-14, widths 8/16/32) on Fashion-MNIST.

  python -m experiments.pretrain --config fmnist_resnet

No augmentation: a few epochs leave these small models underfitting, not overfitting.
"""
import ml_collections
from ml_collections import config_dict

from experiments import data


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "fmnist_resnet"  # rapq_jax.models name, also the checkpoint's file stem
  config.seed = 0  # parameter init, batch order, dropout

  config.data_dir = config_dict.placeholder(str)  # Fashion-MNIST IDX files (default: Debian's)
  config.train_size = config_dict.placeholder(int)  # first n training images (None: all 60000)
  config.test_size = config_dict.placeholder(int)  # first n test images (None: all 10000)
  config.mean = data.FASHION_MNIST_MEAN
  config.std = data.FASHION_MNIST_STD

  config.epochs = 3
  config.batch_size = 128
  config.learning_rate = 3e-3  # AdamW peak: linear warmup, then cosine decay to 0
  config.warmup_epochs = 0.3
  config.weight_decay = 1e-4  # decoupled, on conv and dense kernels only
  config.eval_batch_size = 1000
  return config
