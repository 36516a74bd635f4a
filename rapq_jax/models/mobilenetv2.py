"""torchvision MobileNetV2 (width 1.0).

Input: NHWC float32 [N, H, W, 3] (224x224 for ImageNet). Output: logits float32 [N, num_classes].

Flax names follow the naming rule of ``rapq_jax.models`` with torchvision's module
paths (``features.2.conv.1.0`` -> submodule ``features_2``, layer ``conv_1_0``):
stem ``features_0`` with ``0`` (3x3/2 conv) and ``1`` (BN); ``features_1`` with
``conv_0_0`` (depthwise conv), ``conv_0_1`` (BN), ``conv_1`` (pointwise-linear conv),
``conv_2`` (BN); ``features_2`` .. ``features_17`` with ``conv_0_0``, ``conv_0_1``
(1x1 expand + BN), ``conv_1_0``, ``conv_1_1`` (depthwise + BN), ``conv_2``
(projection conv), ``conv_3`` (BN); ``features_18`` with ``0`` (1x1 conv) and ``1``
(BN); head ``classifier_1``. Depthwise kernels are HWIO [3, 3, 1, C].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rapq_jax.models.resnet import batch_norm

# (expand ratio t, output channels c, repeats n, first stride s) per stage.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv(features: int, kernel: int, stride: int, name: str, groups: int = 1) -> nn.Conv:
  """kxk conv without bias, padded by (k - 1) / 2 on each side as in PyTorch."""
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=False, name=name)


class ConvBNReLU6(nn.Module):
  """Conv + BN + ReLU6 with layers ``0`` and ``1`` (stem ``features_0``, head ``features_18``).

  Attributes:
    out_planes: output channels.
    kernel: kernel size (3 for the stem, 1 for the head).
    stride: conv stride.
  """
  out_planes: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, C] -> [N, H / stride, W / stride, out_planes]."""
    x = conv(self.out_planes, self.kernel, self.stride, '0')(x)
    return nn.relu6(batch_norm(train, '1')(x))


class InvertedResidual(nn.Module):
  """[1x1 expand + BN + ReLU6,] 3x3 depthwise + BN + ReLU6, 1x1 project + BN, residual.

  Attributes:
    in_planes: input channels.
    out_planes: output channels.
    stride: stride of the depthwise conv.
    expand_ratio: hidden channels = round(in_planes * expand_ratio); 1 drops the expansion.
  """
  in_planes: int
  out_planes: int
  stride: int
  expand_ratio: int

  @property
  def hidden_planes(self) -> int:
    """Channels of the depthwise conv."""
    return int(round(self.in_planes * self.expand_ratio))

  @property
  def use_residual(self) -> bool:
    """Whether the input is added to the output (stride 1 and in_planes == out_planes)."""
    return self.stride == 1 and self.in_planes == self.out_planes

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, out_planes]."""
    hidden = self.hidden_planes
    out, layer = x, 0  # index of the depthwise stage inside torchvision's ``conv`` Sequential
    if self.expand_ratio != 1:
      out = nn.relu6(batch_norm(train, 'conv_0_1')(conv(hidden, 1, 1, 'conv_0_0')(out)))
      layer = 1
    out = conv(hidden, 3, self.stride, f'conv_{layer}_0', groups=hidden)(out)
    out = nn.relu6(batch_norm(train, f'conv_{layer}_1')(out))
    out = conv(self.out_planes, 1, 1, f'conv_{layer + 1}')(out)
    out = batch_norm(train, f'conv_{layer + 2}')(out)
    return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
  """MobileNetV2: 3x3/2 stem (32), 17 inverted residual blocks, 1x1 conv to 1280, classifier.

  Attributes:
    num_classes: logits per image.
    dropout_rate: dropout before the classifier (active only with ``train=True``).
    setting: (t, c, n, s) per stage.
    stem_planes: output channels of the stem ``features_0``.
    last_planes: output channels of the last 1x1 conv (torchvision's ``last_channel``).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.2
  setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING
  stem_planes: int = 32
  last_planes: int = 1280

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, C] float32 -> logits [N, num_classes]."""
    x = ConvBNReLU6(self.stem_planes, 3, 2, name='features_0')(x, train)
    in_planes, index = self.stem_planes, 1
    for t, c, n, s in self.setting:
      for i in range(n):
        block = InvertedResidual(in_planes, c, s if i == 0 else 1, t, name=f'features_{index}')
        x = block(x, train)
        in_planes, index = c, index + 1
    x = ConvBNReLU6(self.last_planes, 1, 1, name=f'features_{index}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='classifier_1')(x)
