"""MobileNetV2 on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint)."""
import ml_collections

from experiments.configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  return imagenet_resnet18.brecq_zoo_config("mobilenetv2", "mobilenetv2.pth.tar")
