"""Pretraining fmnist_mobilenet (6 inverted residual blocks, 16 -> 32 -> 128 channels) on Fashion-MNIST.

  python -m experiments.pretrain --config fmnist_mobilenet
"""
import ml_collections

from experiments.configs import pretrain_fmnist_resnet


def get_config() -> ml_collections.ConfigDict:
  config = pretrain_fmnist_resnet.get_config()
  config.model = "fmnist_mobilenet"
  config.batch_size = 64  # more steps per epoch: the depthwise convs make its epochs slow on CPU
  return config
