"""ResNet-56 on CIFAR-10 (shared JPEG copy); FP32 top-1 83.20 %."""
import ml_collections

from experiments.configs import cifar10_resnet20


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_resnet20.get_config()
  config.model = "cifar_resnet56"
  config.checkpoint = "$RAPQ_SHARED_DIR/models/cifar10_resnet56.npz"
  return config
