"""RegNetX (no squeeze-excitation) as in BRECQ's model zoo (pycls's AnyNet/RegNet layout).

Input: NHWC float32 [N, H, W, 3] (224x224 for ImageNet). Output: logits float32 [N, num_classes].

Network: 3x3/2 stem conv-BN-ReLU (32 channels); stages of X blocks, the first block of
every stage with stride 2; global average pool; fully connected head. An X block is a
1x1 conv-BN-ReLU to ``round(width * bottleneck_ratio)`` channels, a 3x3 grouped conv
(``group_width`` channels per group, the block's stride) -BN-ReLU, a 1x1 conv-BN back to
``width``; the shortcut is the identity, or a 1x1 conv (block stride) + BN where the
stride or the width changes; ReLU after the sum.

Flax names follow the naming rule of ``rapq_jax.models`` with BRECQ's module paths:
stem ``stem_conv``, ``stem_bn`` (``stem.conv``, ``stem.bn``); blocks ``s{S}_b{B}``
(``s1.b1``, 1-based as in BRECQ) with ``f_a``, ``f_a_bn``, ``f_b``, ``f_b_bn``, ``f_c``,
``f_c_bn`` (``f.a``, ``f.a_bn``, ...) and, where the shape changes, ``proj`` (1x1 conv)
and ``bn`` (its BN); head ``head_fc`` (``head.fc``). BRECQ's BN names contain an
underscore (``f.a_bn``), which the rule cannot express; ``rapq_jax.convert``'s ``brecq``
scheme maps them. Kernels are HWIO (grouped: [3, 3, group_width, C]), Dense [in, out].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax.models.mobilenetv2 import conv
from rapq_jax.models.resnet import batch_norm


def regnetx_stages(slope: float, initial_width: int, width_mult: float, depth: int,
                   group_width: int, quantum: int = 8) -> tuple[tuple[int, int, int], ...]:
  """(depth, width, group width) per stage of a RegNet from its design-space parameters.

  Follows "Designing Network Design Spaces" (Radosavovic et al. 2020), as pycls and BRECQ
  build it: block j gets the continuous width ``initial_width + slope * j``, which is
  snapped to ``initial_width * width_mult**k`` (k the nearest integer in log space) and
  rounded to a multiple of ``quantum``; runs of equal widths form the stages. A stage's
  group width is ``min(group_width, width)`` and its width is rounded to a multiple of it
  (bottleneck ratio 1). numpy's arithmetic (and round-half-to-even), as the originals.
  """
  continuous = np.arange(depth) * slope + initial_width
  steps = np.round(np.log(continuous / initial_width) / np.log(width_mult))
  widths = (np.round(initial_width * np.power(width_mult, steps) / quantum) * quantum)
  stages: list[list[int]] = []
  for width in widths.astype(int).tolist():
    if stages and stages[-1][1] == width:
      stages[-1][0] += 1
    else:
      stages.append([1, width])
  result = []
  for count, width in stages:
    group = min(group_width, width)
    result.append((count, int(round(width / group) * group), group))
  return tuple(result)


# BRECQ's regnetX_600M_config (WA 36.97, W0 48, WM 2.24, DEPTH 16, GROUP_W 24) and
# regnetX_3200M_config (WA 26.31, W0 88, WM 2.25, DEPTH 25, GROUP_W 48):
# ((1, 48, 24), (3, 96, 24), (5, 240, 24), (7, 528, 24)) and
# ((2, 96, 48), (6, 192, 48), (15, 432, 48), (2, 1008, 48)).
REGNETX_600M_STAGES = regnetx_stages(36.97, 48, 2.24, 16, 24)
REGNETX_3200M_STAGES = regnetx_stages(26.31, 88, 2.25, 25, 48)


class XBlock(nn.Module):
  """RegNet X block: 1x1, 3x3 grouped (strided), 1x1 conv-BN (ReLU after the first two),
  plus identity or 1x1 conv-BN projection shortcut, ReLU after the sum.

  Attributes:
    in_planes: input channels.
    planes: output channels (the stage width).
    stride: stride of the 3x3 conv and of the projection.
    group_width: channels per group of the 3x3 conv.
    bottleneck_ratio: inner channels = round(planes * bottleneck_ratio) (1 in RegNetX).
  """
  in_planes: int
  planes: int
  stride: int
  group_width: int
  bottleneck_ratio: float = 1.0

  @property
  def bottleneck_planes(self) -> int:
    """Channels of the 3x3 grouped conv."""
    return int(round(self.planes * self.bottleneck_ratio))

  @property
  def groups(self) -> int:
    """Groups of the 3x3 conv (BRECQ: ``w_b // gw``)."""
    return self.bottleneck_planes // self.group_width

  @property
  def has_proj(self) -> bool:
    """Whether the shortcut is a 1x1 conv + BN (``proj``, ``bn``)."""
    return self.stride != 1 or self.in_planes != self.planes

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, in_planes] -> [N, H / stride, W / stride, planes]."""
    inner = self.bottleneck_planes
    if inner % self.group_width:
      raise ValueError(f'{inner} bottleneck channels do not split into groups of '
                       f'{self.group_width}')
    out = nn.relu(batch_norm(train, 'f_a_bn')(conv(inner, 1, 1, 'f_a')(x)))
    out = conv(inner, 3, self.stride, 'f_b', groups=self.groups)(out)
    out = nn.relu(batch_norm(train, 'f_b_bn')(out))
    out = batch_norm(train, 'f_c_bn')(conv(self.planes, 1, 1, 'f_c')(out))
    if self.has_proj:
      x = batch_norm(train, 'bn')(conv(self.planes, 1, self.stride, 'proj')(x))
    return nn.relu(x + out)


class RegNetX(nn.Module):
  """RegNetX: 3x3/2 stem, stages of X blocks (stride 2 at each stage's first block), fc.

  Attributes:
    stages: (depth, width, group width) per stage, e.g. ``REGNETX_600M_STAGES``.
    num_classes: logits per image.
    stem_planes: output channels of the stem (32 in RegNet).
    bottleneck_ratio: inner width of every block relative to its output width.
  """
  stages: Sequence[tuple[int, int, int]]
  num_classes: int = 1000
  stem_planes: int = 32
  bottleneck_ratio: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[N, H, W, C] float32 -> logits [N, num_classes]."""
    x = conv(self.stem_planes, 3, 2, 'stem_conv')(x)
    x = nn.relu(batch_norm(train, 'stem_bn')(x))
    in_planes = self.stem_planes
    for s, (depth, width, group_width) in enumerate(self.stages, 1):
      for b in range(1, depth + 1):
        block = XBlock(in_planes, width, 2 if b == 1 else 1, group_width,
                       self.bottleneck_ratio, name=f's{s}_b{b}')
        x = block(x, train)
        in_planes = width
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head_fc')(x)
