"""A BN-folded network as a sequence of reconstruction units, with a pure forward pass.

A ``Network`` is static structure (``units``: which layers each unit has, how they are
wired, where activations are quantized) plus pytrees of arrays:

* ``params[unit][layer] = {'kernel': HWIO or [in, out] float32, 'bias': [out] float32}``
  (BatchNorm already folded in),
* ``bn[unit][layer] = {'mean': [out], 'var': [out], 'gamma': [out]}``: the statistics a
  folded layer's output should have (BN ``beta`` and ``gamma**2 * var / (var + eps)``)
  and the BN scale, for layers that had a BatchNorm.

Quantization is injected through two callables so that the same forward serves the FP
network, fake-quant reconstruction and the final quantized model:
``wq(layer, kernel) -> kernel`` and ``aq(point, x) -> x``.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

WeightHook = Callable[[str, jax.Array], jax.Array]
ActHook = Callable[[str, jax.Array], jax.Array]

UNIT_KINDS = ("conv", "basic", "bottleneck", "inverted", "head")


@dataclasses.dataclass(frozen=True)
class Layer:
  """A weight layer. ``path`` is the Flax module path it came from ('a/b')."""
  role: str
  path: str
  stride: int = 1
  groups: int = 1
  dense: bool = False


@dataclasses.dataclass(frozen=True)
class ActPoint:
  """A per-tensor activation quantizer; ``signed`` where no ReLU precedes it."""
  name: str
  signed: bool = False


@dataclasses.dataclass(frozen=True)
class Unit:
  """One reconstruction unit (hashable; static under jit).

  kind: 'conv' (conv + BN + act, optional max-pool), 'basic' / 'bottleneck' (ResNet
    blocks), 'inverted' (MobileNetV2 block), 'head' (global average pool + dense).
  shortcut: 'none', 'identity', 'option_a' (CIFAR zero-padded subsampling) or 'conv'.
  """
  name: str
  kind: str
  layers: tuple[Layer, ...]
  acts: tuple[ActPoint, ...]
  shortcut: str = "none"
  activation: str = "relu"
  maxpool: bool = False

  def layer(self, role: str) -> Layer:
    return next(l for l in self.layers if l.role == role)

  def has(self, role: str) -> bool:
    return any(l.role == role for l in self.layers)

  @property
  def last_bn_layer(self) -> str | None:
    """Role of the layer whose BN scale defines the unit's Lp exponent."""
    return {"conv": "conv", "basic": "conv2", "bottleneck": "conv3",
            "inverted": "project", "head": None}[self.kind]

  @property
  def rescalable_links(self) -> tuple[tuple[str, str, str], ...]:
    """``(producer, point, consumer)`` of each inner activation point that only a ReLU
    separates from the layers around it, so that scaling the producer's output channels
    by ``g > 0`` and the consumer's inputs by ``1 / g`` keeps the unit's function
    (``rapq_jax.align``); none under ReLU6, which is not positively homogeneous."""
    if self.activation != "relu":
      return ()
    if self.kind == "basic":
      return (("conv1", "relu1", "conv2"),)
    if self.kind == "bottleneck":
      return (("conv1", "relu1", "conv2"), ("conv2", "relu2", "conv3"))
    if self.kind == "inverted":
      return ((("expand", "relu1", "dw"),) if self.has("expand") else ()) + (
          ("dw", "relu2", "project"),)
    return ()


def unit_acts(kind: str, roles, *, network_input: bool = False) -> tuple[ActPoint, ...]:
  """The activation quantizers of a unit kind: after each inner ReLU (unsigned) and at
  the output (signed only for MobileNetV2's linear bottleneck); the network input
  (signed) where ``network_input``; none in the head, whose input the unit before owns."""
  if kind == "conv":
    return ((ActPoint("input", True),) if network_input else ()) + (ActPoint("out"),)
  if kind in ("basic", "bottleneck"):
    inner = ("relu1",) if kind == "basic" else ("relu1", "relu2")
    return tuple(ActPoint(n) for n in inner) + (ActPoint("out"),)
  if kind == "inverted":
    inner = ("relu1", "relu2") if "expand" in roles else ("relu2",)
    return tuple(ActPoint(n) for n in inner) + (ActPoint("out", True),)
  if kind == "head":
    return ()
  raise ValueError(f"unknown unit kind {kind!r}; expected one of {UNIT_KINDS}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Network:
  units: tuple[Unit, ...] = dataclasses.field(metadata=dict(static=True))
  params: dict
  bn: dict


def activation(kind: str, x):
  """A unit's activation: ``'relu6'`` or ReLU."""
  return jax.nn.relu6(x) if kind == "relu6" else jax.nn.relu(x)


def layer_apply(layer: Layer, kernel, bias, x):
  """Applies one folded layer: NHWC conv (PyTorch padding k//2) or dense."""
  if layer.dense:
    return x @ kernel + bias
  k = kernel.shape[0]
  y = jax.lax.conv_general_dilated(
      x, kernel, (layer.stride, layer.stride), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=layer.groups)
  return y + bias


def option_a(x, out_channels: int):
  """The CIFAR ResNets' parameter-free shortcut: stride-2 subsampling, channels
  zero-padded equally on both sides to ``out_channels``."""
  x = x[:, ::2, ::2, :]
  pad = (out_channels - x.shape[-1]) // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, out_channels - x.shape[-1] - pad)))


def maxpool(x):
  """3x3 max pooling, stride 2, padding 1 (torchvision ResNet's stem)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def identity_hook(_, x):
  return x


def unit_apply(unit: Unit, params: dict, x, wq: WeightHook = identity_hook,
               aq: ActHook = identity_hook):
  """Forward of one unit.

  Args:
    unit: static structure.
    params: ``{role: {'kernel', 'bias'}}`` of this unit.
    x: float32 NHWC input (or ``[N, C]`` never: the head pools itself).
  Returns:
    (y, pre): the unit output and ``{role: folded layer output before activation}``.
  """
  pre = {}

  def lin(role, h):
    layer = unit.layer(role)
    y = layer_apply(layer, wq(role, params[role]["kernel"]), params[role]["bias"], h)
    pre[role] = y
    return y

  act = lambda h: activation(unit.activation, h)
  if unit.kind == "head":
    return lin("fc", jnp.mean(x, axis=(1, 2))), pre
  if unit.kind == "conv":
    if unit.acts[0].name == "input":
      x = aq("input", x)
    y = act(lin("conv", x))
    if unit.maxpool:
      y = maxpool(y)
    return aq("out", y), pre
  if unit.kind in ("basic", "bottleneck"):
    y = aq("relu1", act(lin("conv1", x)))
    if unit.kind == "basic":
      y = lin("conv2", y)
    else:
      y = lin("conv3", aq("relu2", act(lin("conv2", y))))
    if unit.shortcut == "conv":
      short = lin("shortcut", x)
    elif unit.shortcut == "option_a":
      short = option_a(x, y.shape[-1])
    else:
      short = x
    return aq("out", act(y + short)), pre
  if unit.kind == "inverted":
    y = aq("relu1", act(lin("expand", x))) if unit.has("expand") else x
    y = lin("project", aq("relu2", act(lin("dw", y))))
    if unit.shortcut == "identity":
      y = y + x
    return aq("out", y), pre
  raise ValueError(f"unknown unit kind {unit.kind!r}; expected one of {UNIT_KINDS}")


def network_apply(net: Network, x, wq_for=None, aq_for=None, *, until: int | None = None):
  """Forward through ``net.units[:until]``.

  ``wq_for(unit_name) -> WeightHook`` and ``aq_for(unit_name) -> ActHook`` give the
  hooks of each unit (identity when None). Returns the last unit's output.
  """
  for unit in net.units[:until]:
    wq = wq_for(unit.name) if wq_for else identity_hook
    aq = aq_for(unit.name) if aq_for else identity_hook
    x, _ = unit_apply(unit, net.params[unit.name], x, wq, aq)
  return x
