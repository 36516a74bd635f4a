"""The unit kinds of a folded network, each described once as a small program.

A reconstruction unit is a few weight layers and their wiring: a conv stem, a ResNet basic
block or bottleneck, a MobileNetV2 inverted residual, the classifier head. Each kind is
written here once, as a straight-line program over named values (``Op``) built from a
handful of operations; everything that needs the wiring interprets that one program:

* the float / fake-quant forward of reconstruction (``rapq_jax.network.unit_apply``),
* the simulation of the deployed integer model (``rapq_jax.quantized.apply``),
* the lowering to integer-only ops (``rapq_jax.integer.lower``),
* what is derived from it: a unit's activation points (``unit_acts``), the activation
  point feeding each layer (``layer_inputs``) and the channel-rescalable links
  (``rescalable_links``).

The adapter (``rapq_jax.adapter``) matches a user's model against the kinds' layer roles.
Adding a unit kind is one ``register(Kind(...))`` here; the interpreters need nothing new
as long as its program uses the operations below.

Operations (``Op.op``; values are named strings, the unit input is ``'x'``):

* ``'quant'`` (``point``, ``signed``): the per-tensor activation quantizer ``point``;
* ``'linear'`` (``role``): the unit's weight layer ``role`` (conv or dense, bias folded);
* ``'act'``: the unit's activation (ReLU or ReLU6, ``Unit.activation``);
* ``'maxpool'``: 3x3 max pooling, stride 2, padding 1;
* ``'avgpool'``: global average pooling ``[N, H, W, C] -> [N, C]``;
* ``'subsample_pad'`` (inputs ``x``, ``like``): CIFAR option-A shortcut, ``x`` subsampled
  by 2 and zero-padded on channels to the channels of ``like``;
* ``'add'`` (``point``): a residual sum; ``point`` is the activation point that
  requantizes it (the integer path aligns the operands from its exponent).

The program's last value is the unit output.
"""
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

OPS = ("quant", "linear", "act", "maxpool", "avgpool", "subsample_pad", "add")
ACTIVATIONS = ("relu", "relu6")     # and "none" for a kind whose program has no act


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

  kind: a registered kind (``KINDS``): 'conv' (conv + BN + act, optional max-pool),
    'linear_conv' (conv + BN), 'basic' / 'bottleneck' (ResNet blocks), 'inverted'
    (MobileNetV2 block), 'head' (global average pool + dense).
  activation: 'relu' or 'relu6' ('none' for a kind without one).
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
  def program(self) -> tuple["Op", ...]:
    """The unit's wiring as a straight-line program (see the module docstring)."""
    return _program(self.kind, Shape(tuple(l.role for l in self.layers), self.shortcut,
                                     self.maxpool, any(a.name == "input" for a in self.acts)))

  @property
  def last_bn_layer(self) -> str | None:
    """Role of the layer whose BN scale defines the unit's Lp exponent."""
    return kind_of(self.kind).bn_role

  @property
  def rescalable_links(self) -> tuple[tuple[str, str, str], ...]:
    """``(producer, point, consumer)`` of each inner activation point that only a ReLU
    separates from the layers around it, so that scaling the producer's output channels
    by ``g > 0`` and the consumer's inputs by ``1 / g`` keeps the unit's function
    (``rapq_jax.align``); none under ReLU6, which is not positively homogeneous. Read
    off the program: ``linear -> act -> quant`` whose value only one ``linear`` reads."""
    if self.activation != "relu":
      return ()
    program = self.program
    made = {op.out: op for op in program}
    links = []
    for op in program:
      if op.op != "quant" or op.inputs[0] not in made:
        continue
      act = made[op.inputs[0]]
      producer = made.get(act.inputs[0]) if act.op == "act" else None
      readers = [r for r in program if op.out in r.inputs]
      if (producer is not None and producer.op == "linear" and len(readers) == 1
          and readers[0].op == "linear"):
        links.append((producer.role, op.point, readers[0].role))
    return tuple(links)


class Op(NamedTuple):
  """One operation of a unit program: ``out = op(*inputs)``; ``role`` names the weight
  layer of a ``'linear'``, ``point`` the activation point of a ``'quant'`` (``signed``:
  its range) or of the requantization after an ``'add'``."""
  op: str
  out: str
  inputs: tuple[str, ...]
  role: str | None = None
  point: str | None = None
  signed: bool = False


class Shape(NamedTuple):
  """What a kind's program depends on: the unit's layer roles in order, its shortcut,
  whether it max-pools and whether it quantizes the network input."""
  roles: tuple[str, ...]
  shortcut: str = "none"
  maxpool: bool = False
  network_input: bool = False


@dataclasses.dataclass(frozen=True)
class Kind:
  """A unit kind.

  program: the unit's wiring for a ``Shape``.
  bn_role: the layer whose BatchNorm scale gives the unit's Lp exponent (None: no BN).
  role_sets: the layer roles it accepts, each in call order (a ``'shortcut'`` role is a
    conv that reads the unit input beside the main path).
  shortcuts, activations: those it accepts, in the order the adapter tries them.
  depthwise_roles: roles whose conv must be depthwise (the adapter tries first the kinds
    whose depthwise roles are exactly a group's depthwise convs).
  maxpool: whether it may max-pool its output.
  dense: whether its one layer is a dense classifier (the head).
  about: what it is, for messages.
  """
  name: str
  about: str
  program: Callable[[Shape], tuple[Op, ...]]
  bn_role: str | None
  role_sets: tuple[tuple[str, ...], ...]
  shortcuts: tuple[str, ...] = ("none",)
  activations: tuple[str, ...] = ACTIVATIONS
  depthwise_roles: tuple[str, ...] = ()
  maxpool: bool = False
  dense: bool = False


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
  """Adds ``kind`` to ``KINDS`` (a name registered twice is an error)."""
  if kind.name in KINDS:
    raise ValueError(f"unit kind {kind.name!r} is already registered")
  KINDS[kind.name] = kind
  return kind


@functools.lru_cache(maxsize=None)
def _program(kind: str, shape: Shape) -> tuple[Op, ...]:
  return kind_of(kind).program(shape)


def kind_of(name: str) -> Kind:
  """The registered kind ``name``; ValueError listing the kinds otherwise."""
  if name not in KINDS:
    raise ValueError(f"unknown unit kind {name!r}; expected one of {tuple(KINDS)}")
  return KINDS[name]


class _Writer:
  """Builds a program: each method appends one ``Op`` and returns its value's name."""

  def __init__(self):
    self.ops: list[Op] = []

  def _emit(self, op: str, out: str, *inputs: str, **fields) -> str:
    self.ops.append(Op(op, out, tuple(inputs), **fields))
    return out

  def quant(self, point: str, x: str, signed: bool = False) -> str:
    return self._emit("quant", f"@{point}", x, point=point, signed=signed)

  def linear(self, role: str, x: str) -> str:
    return self._emit("linear", role, x, role=role)

  def act(self, x: str) -> str:
    return self._emit("act", f"act({x})", x)

  def maxpool(self, x: str) -> str:
    return self._emit("maxpool", "maxpool", x)

  def avgpool(self, x: str) -> str:
    return self._emit("avgpool", "avgpool", x)

  def subsample_pad(self, x: str, like: str) -> str:
    return self._emit("subsample_pad", "option_a", x, like)

  def add(self, a: str, b: str, point: str) -> str:
    return self._emit("add", "add", a, b, point=point)


def _conv(s: Shape) -> tuple[Op, ...]:
  w = _Writer()
  x = w.quant("input", "x", signed=True) if s.network_input else "x"
  y = w.act(w.linear("conv", x))
  w.quant("out", w.maxpool(y) if s.maxpool else y)
  return tuple(w.ops)


def _linear_conv(s: Shape) -> tuple[Op, ...]:
  """One conv with no activation after it (e.g. the 1x1 projection of MnasNet's
  separable stem): a signed output quantizer."""
  w = _Writer()
  x = w.quant("input", "x", signed=True) if s.network_input else "x"
  w.quant("out", w.linear("conv", x), signed=True)
  return tuple(w.ops)


def _residual(s: Shape) -> tuple[Op, ...]:
  """ResNet basic block (conv1, conv2) or bottleneck (conv1, conv2, conv3): every conv
  but the last followed by the activation and a quantizer, then the shortcut, the sum,
  the activation and the output quantizer."""
  w = _Writer()
  main = [r for r in s.roles if r != "shortcut"]
  h = "x"
  for i, role in enumerate(main[:-1], start=1):
    h = w.quant(f"relu{i}", w.act(w.linear(role, h)))
  y = w.linear(main[-1], h)
  short = {"conv": lambda: w.linear("shortcut", "x"),
           "option_a": lambda: w.subsample_pad("x", y),
           "identity": lambda: "x"}[s.shortcut]()
  w.quant("out", w.act(w.add(y, short, "out")))
  return tuple(w.ops)


def _inverted(s: Shape) -> tuple[Op, ...]:
  """MobileNetV2 inverted residual: [1x1 expand, act, quantizer,] depthwise, act,
  quantizer, 1x1 projection (linear), [identity sum,] signed output quantizer."""
  w = _Writer()
  h = w.quant("relu1", w.act(w.linear("expand", "x"))) if "expand" in s.roles else "x"
  y = w.linear("project", w.quant("relu2", w.act(w.linear("dw", h))))
  if s.shortcut == "identity":
    y = w.add(y, "x", "out")
  w.quant("out", y, signed=True)
  return tuple(w.ops)


def _head(s: Shape) -> tuple[Op, ...]:
  del s
  w = _Writer()
  w.linear("fc", w.avgpool("x"))
  return tuple(w.ops)


register(Kind("conv", "one conv (+ BN, activation, optional 3x3/2 max-pool)", _conv,
              bn_role="conv", role_sets=(("conv",),), maxpool=True))
register(Kind("linear_conv", "one conv (+ BN) without activation", _linear_conv,
              bn_role="conv", role_sets=(("conv",),), activations=("none",)))
register(Kind("basic", "a ResNet basic block (2 convs, optional 1x1 shortcut conv)",
              _residual, bn_role="conv2",
              role_sets=(("conv1", "conv2"), ("conv1", "conv2", "shortcut")),
              shortcuts=("identity", "option_a", "conv")))
register(Kind("bottleneck", "a ResNet bottleneck (3 convs, any grouping, optional 1x1 "
              "shortcut conv)", _residual, bn_role="conv3",
              role_sets=(("conv1", "conv2", "conv3"), ("conv1", "conv2", "conv3", "shortcut")),
              shortcuts=("identity", "option_a", "conv")))
register(Kind("inverted", "a MobileNetV2 inverted residual ([1x1 expand,] depthwise, 1x1 "
              "project)", _inverted, bn_role="project",
              role_sets=(("dw", "project"), ("expand", "dw", "project")),
              shortcuts=("identity", "none"), activations=("relu6", "relu"),
              depthwise_roles=("dw",)))
register(Kind("head", "global average pooling + the dense classifier", _head, bn_role=None,
              role_sets=(("fc",),), activations=("none",), dense=True))


def unit_acts(kind: str, roles, *, network_input: bool = False) -> tuple[ActPoint, ...]:
  """The activation quantizers of a unit kind with layer ``roles``, in program order:
  after each inner activation (unsigned) and at the output (signed only for MobileNetV2's
  linear bottleneck); the network input (signed) where ``network_input``; none in the
  head, whose input the unit before owns."""
  k = kind_of(kind)
  roles = tuple(roles)
  if roles not in k.role_sets:
    raise ValueError(f"a {kind!r} unit has layer roles {' or '.join(map(str, k.role_sets))}, "
                     f"not {roles}")
  # A shortcut does not change the quantizers; any accepted one gives the program.
  program = k.program(Shape(roles, k.shortcuts[0], False, network_input))
  return tuple(ActPoint(op.point, op.signed) for op in program if op.op == "quant")


def layer_inputs(unit: Unit) -> dict:
  """``{role: point}``: the activation point feeding each layer, ``None`` for the unit
  input (the previous unit's ``'out'``) or an unquantized value (the head's pooled
  input)."""
  made = {op.out: op for op in unit.program}
  out = {}
  for op in unit.program:
    if op.op == "linear":
      src = made.get(op.inputs[0])
      out[op.role] = src.point if src is not None and src.op == "quant" else None
  return {l.role: out[l.role] for l in unit.layers}


# ------------------------------------------------------------------ float operations

def wiring_op(unit: Unit, op: Op, args: list):
  """The float value of an ``'act'``, ``'maxpool'`` or ``'subsample_pad'``: the ops every
  float interpreter computes alike (the integer path keeps each value's grid through
  them)."""
  if op.op == "act":
    return activation(unit.activation, args[0])
  if op.op == "maxpool":
    return maxpool(args[0])
  if op.op == "subsample_pad":
    return option_a(args[0], args[1].shape[-1])
  raise ValueError(f"unit {unit.name!r}: {op.op!r} is not a wiring op")


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
