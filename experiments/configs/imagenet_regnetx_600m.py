"""RegNetX-600MF on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint, key scheme 'brecq')."""
import ml_collections

from experiments.configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_resnet18.get_config()
  config.model = "regnetx_600m"
  config.checkpoint = "https://github.com/yhhhli/BRECQ/releases/download/v1.0/regnet_600m.pth.tar"
  config.checkpoint_scheme = "brecq"
  return config
