"""Flax linen image classifiers whose variables mirror their PyTorch originals.

Every model takes NHWC float32 images and is called as
``model.apply({'params': p, 'batch_stats': s}, x, train=False)``, returning logits.

Naming rule (a contract: BN folding and checkpoint conversion rely on it): Flax paths
mirror PyTorch module paths. The first two dot components of a block path form one
submodule name joined by ``_`` and the remaining components form the leaf layer name
joined by ``_``; top-level stem/head layers keep their torch name. Examples:
``layer1.0.conv1`` -> ``params['layer1_0']['conv1']``,
``layer2.0.downsample.0`` -> ``params['layer2_0']['downsample_0']``,
``features.2.conv.1.0`` -> ``params['features_2']['conv_1_0']``,
``conv1`` -> ``params['conv1']``, ``classifier.1`` -> ``params['classifier_1']``.
A block is the module whose path is a residual block (a reconstruction unit); where a
network nests its blocks one level deeper, the block path has three components and they
form the submodule name: MnasNet's ``layers.8.0.layers.3`` -> ``params['layers_8_0']['layers_3']``.
Every block is one submodule holding its layers directly (``params[block][layer]``).
Converting a Flax path back to a PyTorch key replaces every ``_`` with ``.``; PyTorch
names that themselves contain ``_`` (BRECQ's RegNet ``s1.b1.f.a_bn``, Flax ``s1_b1`` /
``f_a_bn``) are restored by a checkpoint key scheme of ``rapq_jax.convert``.
Conv kernels are HWIO (no bias), Dense kernels [in, out]; BN has ``scale``, ``bias``
in ``params`` and ``mean``, ``var`` in ``batch_stats``.
"""
import flax.linen as nn

from rapq_jax.models.cifar_resnet import CifarBasicBlock, CifarResNet
from rapq_jax.models.mnasnet import MnasInvertedResidual, MnasNet
from rapq_jax.models.mobilenetv2 import ConvBNReLU6, InvertedResidual, MobileNetV2
from rapq_jax.models.regnet import REGNETX_600M_STAGES, REGNETX_3200M_STAGES, RegNetX, XBlock
from rapq_jax.models.resnet import BasicBlock, Bottleneck, ResNet

# Fashion-MNIST MobileNetV2: (t, c, n, s) per stage, 6 inverted residual blocks.
FMNIST_MOBILENET_SETTING = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1))

# name -> (constructor taking num_classes, default num_classes, input image (H, W, C))
_MODELS = {
    'cifar_resnet20': (lambda k: CifarResNet(num_blocks=3, num_classes=k), 10, (32, 32, 3)),
    'cifar_resnet32': (lambda k: CifarResNet(num_blocks=5, num_classes=k), 10, (32, 32, 3)),
    'cifar_resnet44': (lambda k: CifarResNet(num_blocks=7, num_classes=k), 10, (32, 32, 3)),
    'cifar_resnet56': (lambda k: CifarResNet(num_blocks=9, num_classes=k), 10, (32, 32, 3)),
    'resnet18': (lambda k: ResNet((2, 2, 2, 2), BasicBlock, num_classes=k), 1000, (224, 224, 3)),
    'resnet50': (lambda k: ResNet((3, 4, 6, 3), Bottleneck, num_classes=k), 1000, (224, 224, 3)),
    'mobilenetv2': (lambda k: MobileNetV2(num_classes=k), 1000, (224, 224, 3)),
    'fmnist_resnet': (lambda k: CifarResNet(num_blocks=2, num_classes=k, widths=(8, 16, 32)),
                      10, (28, 28, 1)),
    'fmnist_mobilenet': (lambda k: MobileNetV2(num_classes=k, dropout_rate=0.0,
                                               setting=FMNIST_MOBILENET_SETTING, stem_planes=16,
                                               last_planes=128),
                         10, (28, 28, 1)),
    # BRECQ's model zoo (checkpoint scheme 'brecq'); its MnasNet is MnasNet-2.0.
    'regnetx_600m': (lambda k: RegNetX(REGNETX_600M_STAGES, num_classes=k), 1000, (224, 224, 3)),
    'regnetx_3200m': (lambda k: RegNetX(REGNETX_3200M_STAGES, num_classes=k), 1000,
                      (224, 224, 3)),
    'mnasnet': (lambda k: MnasNet(scale=2.0, num_classes=k), 1000, (224, 224, 3)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def _entry(name: str) -> tuple:
  """The ``_MODELS`` entry of ``name``; ValueError listing the accepted names otherwise."""
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; expected one of {", ".join(MODEL_NAMES)}')
  return _MODELS[name]


def get_model(name: str, num_classes: int | None = None) -> nn.Module:
  """The model called ``name`` (one of ``MODEL_NAMES``), with its dataset's class count by default."""
  build, default_classes, _ = _entry(name)
  return build(default_classes if num_classes is None else num_classes)


def input_shape(name: str) -> tuple[int, int, int]:
  """(H, W, C) of the images the model called ``name`` was trained on."""
  return _entry(name)[2]


__all__ = [
    'MODEL_NAMES', 'FMNIST_MOBILENET_SETTING', 'get_model', 'input_shape', 'CifarResNet',
    'CifarBasicBlock', 'ResNet', 'BasicBlock', 'Bottleneck', 'MobileNetV2', 'InvertedResidual',
    'ConvBNReLU6', 'RegNetX', 'XBlock', 'MnasNet', 'MnasInvertedResidual',
]
