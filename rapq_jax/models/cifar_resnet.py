"""CIFAR ResNet-20/32/44/56 (He et al. 2016; akamaster/pytorch_resnet_cifar10 layout).

Input: NHWC float32 [N, 32, 32, 3] (any H, W, C works, e.g. 28x28x1 Fashion-MNIST).
Output: logits float32 [N, num_classes].

Flax names follow the naming rule of ``rapq_jax.models`` (PyTorch path
``layer1.0.conv1`` -> submodule ``layer1_0``, layer ``conv1``):
``conv1``, ``bn1``, blocks ``layer{1,2,3}_{i}`` with ``conv1``, ``bn1``,
``conv2``, ``bn2``, and ``linear``. Kernels are HWIO, Dense kernels [in, out].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rapq_jax.models.resnet import batch_norm, conv3x3


class CifarBasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an option-A (parameter-free) shortcut.

  Attributes:
    in_planes: input channels.
    planes: output channels.
    stride: stride of ``conv1``.
  """
  in_planes: int
  planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, planes]."""
    out = nn.relu(batch_norm(train, 'bn1')(conv3x3(self.planes, self.stride, 'conv1')(x)))
    out = batch_norm(train, 'bn2')(conv3x3(self.planes, 1, 'conv2')(out))
    shortcut = x
    if self.stride != 1 or self.in_planes != self.planes:
      pad = (self.planes - self.in_planes) // 2  # planes // 4 when the width doubles
      shortcut = jnp.pad(x[:, ::2, ::2, :],
                         ((0, 0), (0, 0), (0, 0), (pad, self.planes - self.in_planes - pad)))
    return nn.relu(out + shortcut)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs: 3 stages of n blocks with 16, 32, 64 channels by default.

  Attributes:
    num_blocks: blocks per stage n (3 -> ResNet-20, 9 -> ResNet-56).
    num_classes: logits per image.
    widths: channels of the 3 stages (the stem has ``widths[0]``); each at least the
      previous one, since the option-A shortcut zero-pads channels.
  """
  num_blocks: int
  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, C] float32 -> logits [N, num_classes]."""
    x = nn.relu(batch_norm(train, 'bn1')(conv3x3(self.widths[0], 1, 'conv1')(x)))
    in_planes = self.widths[0]
    for stage, planes in enumerate(self.widths):
      for i in range(self.num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = CifarBasicBlock(in_planes, planes, stride, name=f'layer{stage + 1}_{i}')(x, train)
        in_planes = planes
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='linear')(x)
