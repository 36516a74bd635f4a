"""MnasNet-2.0 (BRECQ's ``mnasnet``) on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint).

BRECQ's hub entry (and so its release ``mnasnet.pth.tar``) builds ``MNASNet(scale=2.0)``,
not torchvision's width-1.0 ``mnasnet1_0``. Its keys read the same under the
'torchvision' and 'brecq' schemes.
"""
import ml_collections

from experiments.configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  return imagenet_resnet18.brecq_zoo_config("mnasnet", "mnasnet.pth.tar")
