"""ResNet-14 (widths 8/16/32) on Fashion-MNIST (Debian IDX files, committed checkpoint).

The checkpoint comes from `python -m experiments.pretrain --config fmnist_resnet`; its
FP32 test top-1 is recorded in experiments/checkpoints/fmnist_resnet.json. Small
reconstruction budgets keep the whole job at a few minutes on CPU.
"""
import ml_collections

from experiments import data
from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.model = "fmnist_resnet"
  config.checkpoint = "experiments/checkpoints/fmnist_resnet.npz"  # relative to the repository
  config.dataset.source = "fashion_mnist"
  config.dataset.train = "train"
  config.dataset.test = "test"
  config.dataset.mean = data.FASHION_MNIST_MEAN
  config.dataset.std = data.FASHION_MNIST_STD
  config.eval_batch_size = 1000
  config.weight_iters = 500
  config.act_iters = 100
  config.ptq.exp_warm_iters = 100  # RAPQ hardens its exponents after these iterations
  return config
