"""ResNet-14 (widths 8/16/32) on Fashion-MNIST (committed data and checkpoint).

The checkpoint comes from `python -m experiments.pretrain --config fmnist_resnet`; its
FP32 test top-1 is recorded in experiments/checkpoints/fmnist_resnet.json. The data are
the committed Fashion-MNIST arrays (`experiments.embed_data`): a class-balanced pool of
4000 training images to draw the calibration sample from and the whole test split, so
the job needs no download. Debian's IDX files (all 60000 training images) instead:
`--config.dataset.source=fashion_mnist --config.dataset.train=train --config.dataset.test=test`.
Small reconstruction budgets keep the whole job at a few minutes on CPU.
"""
import ml_collections

from experiments import data
from experiments import embed_data
from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.model = "fmnist_resnet"
  config.checkpoint = "experiments/checkpoints/fmnist_resnet.npz"  # relative to the repository
  config.dataset.source = "npz"  # relative to the repository, as the checkpoint
  config.dataset.train = f"experiments/checkpoints/{embed_data.TRAIN_FILE}"
  config.dataset.test = f"experiments/checkpoints/{embed_data.TEST_FILE}"
  config.dataset.mean = data.FASHION_MNIST_MEAN
  config.dataset.std = data.FASHION_MNIST_STD
  config.eval_batch_size = 1000
  config.weight_iters = 500
  config.act_iters = 100
  config.ptq.exp_warm_iters = 100  # RAPQ hardens its exponents after these iterations
  return config
