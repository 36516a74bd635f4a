"""RegNetX-3.2GF on ImageNet (TFDS imagenet2012, BRECQ's FP32 checkpoint, key scheme 'brecq').

The quantizing methods fold the network with ``rapq_jax.fold.build_network``, which does
not know RegNet's X blocks (grouped 3x3 convs) yet; until it does, only the checkpoint
and the model are ready.
"""
import ml_collections

from experiments.configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_resnet18.get_config()
  config.model = "regnetx_3200m"
  config.checkpoint = "https://github.com/yhhhli/BRECQ/releases/download/v1.0/regnet_3200m.pth.tar"
  config.checkpoint_scheme = "brecq"
  return config
