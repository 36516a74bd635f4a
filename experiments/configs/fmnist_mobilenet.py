"""Small MobileNetV2 (6 inverted residual blocks) on Fashion-MNIST (committed data and checkpoint, as fmnist_resnet).

The checkpoint comes from `python -m experiments.pretrain --config fmnist_mobilenet`;
its FP32 test top-1 is recorded in experiments/checkpoints/fmnist_mobilenet.json.
"""
import ml_collections

from experiments.configs import fmnist_resnet


def get_config() -> ml_collections.ConfigDict:
  config = fmnist_resnet.get_config()
  config.model = "fmnist_mobilenet"
  config.checkpoint = "experiments/checkpoints/fmnist_mobilenet.npz"  # relative to the repository
  return config
