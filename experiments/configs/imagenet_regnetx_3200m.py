"""RegNetX-3.2GF on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint, key scheme 'brecq')."""
import ml_collections

from experiments.configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  return imagenet_resnet18.brecq_zoo_config("regnetx_3200m", "regnet_3200m.pth.tar")
