"""ResNet-20 on CIFAR-10 (shared JPEG copy); FP32 top-1 81.03 %."""
import ml_collections

from experiments import data
from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.model = "cifar_resnet20"
  config.checkpoint = "$RAPQ_SHARED_DIR/models/cifar10_resnet20.npz"
  config.dataset.source = "npz"
  config.dataset.train = "$RAPQ_SHARED_DIR/data/cifar10_jpeg/train_10k.npz"
  config.dataset.test = "$RAPQ_SHARED_DIR/data/cifar10_jpeg/test.npz"
  config.dataset.mean = data.CIFAR_MEAN
  config.dataset.std = data.CIFAR_STD
  return config
