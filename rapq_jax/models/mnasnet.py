"""MnasNet-A1 without squeeze-excitation (MnasNet-B1), as in BRECQ's model zoo.

Input: NHWC float32 [N, H, W, 3] (224x224 for ImageNet). Output: logits float32 [N, num_classes].

Network (channel counts for depth multiplier ``scale``, see ``mnasnet_depths``): 3x3/2
stem conv-BN-ReLU; a depthwise-separable block without residual (3x3 depthwise
conv-BN-ReLU, 1x1 conv-BN); six stacks of inverted residuals (1x1 expand conv-BN-ReLU,
kxk depthwise conv (stride) -BN-ReLU, 1x1 project conv-BN; residual where the stride is 1
and the channels are equal): (kernel, expansion, repeats, first stride) = (3, 3, 3, 2),
(5, 3, 3, 2), (5, 6, 3, 2), (3, 6, 2, 1), (5, 6, 4, 2), (3, 6, 1, 1); a 1x1 conv-BN-ReLU
to 1280; global average pool; dropout; fully connected head.

BRECQ's ``mnasnet()`` (its hub entry and release checkpoint ``mnasnet.pth.tar``) builds
``MNASNet(scale=2.0)``, MnasNet-2.0 (stem 64, last stack 640 channels), not the width-1.0
network of torchvision's ``mnasnet1_0``; ``scale`` selects either.

Flax names follow the naming rule of ``rapq_jax.models`` with BRECQ's module paths,
which nest everything in one Sequential ``layers``: stem ``layers_0`` (conv),
``layers_1`` (BN); separable block ``layers_3`` (depthwise conv), ``layers_4`` (BN),
``layers_6`` (1x1 conv), ``layers_7`` (BN); inverted residuals ``layers_{8..13}_{i}``
(block ``i`` of stack ``layers.8`` .. ``layers.13``) with ``layers_0``, ``layers_1``
(expand conv, BN), ``layers_3``, ``layers_4`` (depthwise conv, BN), ``layers_6``,
``layers_7`` (project conv, BN); ``layers_14`` (1x1 conv), ``layers_15`` (BN); head
``classifier_1``. The indices skip BRECQ's ReLU modules. Depthwise kernels are HWIO
[k, k, 1, C], Dense kernels [in, out].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rapq_jax.models.mobilenetv2 import conv
from rapq_jax.models.resnet import batch_norm

# (kernel, expansion, repeats, first stride) of the six inverted residual stacks.
MNASNET_STACKS = ((3, 3, 3, 2), (5, 3, 3, 2), (5, 6, 3, 2), (3, 6, 2, 1), (5, 6, 4, 2),
                  (3, 6, 1, 1))
# Channels at depth multiplier 1: stem and separable block input, separable block output,
# then the output of each stack.
MNASNET_BASE_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)


def _round_channels(value: float, divisor: int = 8, min_ratio: float = 0.9) -> int:
  """Nearest multiple of ``divisor`` (at least ``divisor``), one multiple up when that
  lands below ``min_ratio * value``: rounds up rather than down (83 -> 80, 84 -> 88)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded if rounded >= min_ratio * value else rounded + divisor


def mnasnet_depths(scale: float) -> tuple[int, ...]:
  """The eight channel counts of ``MNASNET_BASE_DEPTHS`` at depth multiplier ``scale``."""
  if scale <= 0:
    raise ValueError(f'scale must be positive, got {scale}')
  return tuple(_round_channels(d * scale) for d in MNASNET_BASE_DEPTHS)


class MnasInvertedResidual(nn.Module):
  """1x1 expand conv-BN-ReLU, kxk depthwise conv (stride) -BN-ReLU, 1x1 conv-BN, residual.

  Attributes:
    in_planes: input channels.
    out_planes: output channels.
    kernel: depthwise kernel size (3 or 5).
    stride: stride of the depthwise conv.
    expand_ratio: hidden channels = in_planes * expand_ratio (3 or 6; always expanded).
  """
  in_planes: int
  out_planes: int
  kernel: int
  stride: int
  expand_ratio: int

  @property
  def hidden_planes(self) -> int:
    """Channels of the depthwise conv."""
    return self.in_planes * self.expand_ratio

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, out_planes]."""
    hidden = self.hidden_planes
    out = nn.relu(batch_norm(train, 'layers_1')(conv(hidden, 1, 1, 'layers_0')(x)))
    out = conv(hidden, self.kernel, self.stride, 'layers_3', groups=hidden)(out)
    out = nn.relu(batch_norm(train, 'layers_4')(out))
    out = batch_norm(train, 'layers_7')(conv(self.out_planes, 1, 1, 'layers_6')(out))
    return x + out if self.use_residual else out

  @property
  def use_residual(self) -> bool:
    """Whether the input is added to the output (stride 1 and equal channels)."""
    return self.stride == 1 and self.in_planes == self.out_planes


class MnasNet(nn.Module):
  """MnasNet (SE-free): stem, separable block, 16 inverted residuals, 1x1 conv, classifier.

  Attributes:
    scale: depth multiplier of the channel counts (BRECQ's release: 2.0).
    num_classes: logits per image.
    dropout_rate: dropout before the classifier, active only with ``train=True``
      (BRECQ's default 0.0).
    stacks: (kernel, expansion, repeats, first stride) per inverted residual stack.
    depths: the eight channel counts (``mnasnet_depths(scale)`` when None); tiny test
      variants may set them directly.
    last_planes: output channels of the final 1x1 conv.
  """
  scale: float = 2.0
  num_classes: int = 1000
  dropout_rate: float = 0.0
  stacks: Sequence[tuple[int, int, int, int]] = MNASNET_STACKS
  depths: Sequence[int] | None = None
  last_planes: int = 1280

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, C] float32 -> logits [N, num_classes]."""
    depths = tuple(self.depths) if self.depths is not None else mnasnet_depths(self.scale)
    if len(depths) != len(self.stacks) + 2:
      raise ValueError(f'{len(self.stacks)} stacks need {len(self.stacks) + 2} depths, '
                       f'got {len(depths)}')
    x = nn.relu(batch_norm(train, 'layers_1')(conv(depths[0], 3, 2, 'layers_0')(x)))
    x = conv(depths[0], 3, 1, 'layers_3', groups=depths[0])(x)
    x = nn.relu(batch_norm(train, 'layers_4')(x))
    x = batch_norm(train, 'layers_7')(conv(depths[1], 1, 1, 'layers_6')(x))
    in_planes = depths[1]
    for s, (kernel, expand, repeats, stride) in enumerate(self.stacks):
      index = 8 + s
      for i in range(repeats):
        block = MnasInvertedResidual(in_planes, depths[s + 2], kernel, stride if i == 0 else 1,
                                     expand, name=f'layers_{index}_{i}')
        x = block(x, train)
        in_planes = depths[s + 2]
    index = 8 + len(self.stacks)
    x = conv(self.last_planes, 1, 1, f'layers_{index}')(x)
    x = nn.relu(batch_norm(train, f'layers_{index + 1}')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='classifier_1')(x)
