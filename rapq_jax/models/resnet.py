"""torchvision ResNet-18 (BasicBlock) and ResNet-50 (Bottleneck, v1.5: stride on the 3x3 conv).

Input: NHWC float32 [N, H, W, 3] (224x224 for ImageNet). Output: logits float32 [N, num_classes].

Flax names follow the naming rule of ``rapq_jax.models`` (PyTorch path
``layer1.0.downsample.0`` -> submodule ``layer1_0``, layer ``downsample_0``):
stem ``conv1``, ``bn1``; blocks ``layer{1..4}_{i}`` with ``conv1``, ``bn1``,
``conv2``, ``bn2`` (and ``conv3``, ``bn3`` in a Bottleneck) and, where the shape
changes, ``downsample_0`` (1x1 conv) and ``downsample_1`` (BN); head ``fc``.
Kernels are HWIO, Dense kernels [in, out]; convs have no bias.
"""
from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 in torch terms, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv3x3(features: int, stride: int, name: str) -> nn.Conv:
  """3x3 conv without bias, padded by 1 on each side as in PyTorch."""
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=False, name=name)


def conv1x1(features: int, stride: int, name: str) -> nn.Conv:
  """1x1 conv without bias or padding."""
  return nn.Conv(features, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)),
                 use_bias=False, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers plus identity or 1x1 conv-BN shortcut.

  Attributes:
    in_planes: input channels.
    planes: width of the block; output channels are ``planes * expansion``.
    stride: stride of ``conv1`` and of the downsample conv.
  """
  expansion: ClassVar[int] = 1
  in_planes: int
  planes: int
  stride: int = 1

  @property
  def has_downsample(self) -> bool:
    """Whether the shortcut is a 1x1 conv + BN (``downsample_0``, ``downsample_1``)."""
    return self.stride != 1 or self.in_planes != self.planes * self.expansion

  def shortcut(self, x: jax.Array, train: bool) -> jax.Array:
    """Identity, or 1x1 strided conv + BN when the shape changes."""
    if not self.has_downsample:
      return x
    x = conv1x1(self.planes * self.expansion, self.stride, 'downsample_0')(x)
    return batch_norm(train, 'downsample_1')(x)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, planes]."""
    out = nn.relu(batch_norm(train, 'bn1')(conv3x3(self.planes, self.stride, 'conv1')(x)))
    out = batch_norm(train, 'bn2')(conv3x3(self.planes, 1, 'conv2')(out))
    return nn.relu(out + self.shortcut(x, train))


class Bottleneck(BasicBlock):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN; torchvision v1.5."""
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, 4 * planes]."""
    out = nn.relu(batch_norm(train, 'bn1')(conv1x1(self.planes, 1, 'conv1')(x)))
    out = nn.relu(batch_norm(train, 'bn2')(conv3x3(self.planes, self.stride, 'conv2')(out)))
    out = batch_norm(train, 'bn3')(conv1x1(self.planes * self.expansion, 1, 'conv3')(out))
    return nn.relu(out + self.shortcut(x, train))


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 stem, 3x3/2 max pool, 4 stages (64..512 planes), fc.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_classes: logits per image.
  """
  stage_sizes: Sequence[int]
  block_cls: type[BasicBlock]
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, 3] float32 -> logits [N, num_classes]."""
    x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                name='conv1')(x)
    x = nn.relu(batch_norm(train, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_planes = 64
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = 64 * 2**stage
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = self.block_cls(in_planes, planes, stride, name=f'layer{stage + 1}_{i}')(x, train)
        in_planes = planes * self.block_cls.expansion
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc')(x)
