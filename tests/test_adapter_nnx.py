"""Specification of quantizing a user's own ``flax.nnx`` model (rapq_jax.adapter).

The NNX models below are written the way users write them: submodules built in
``__init__``, blocks kept in a list, ``nnx.Sequential``, ``model.eval()`` before
quantizing. Each has a linen twin (written with ``@nn.compact``) of the same architecture;
with the NNX model's weights copied into the twin, both must quantize to the same
integers, exponents and logits, since everything after recording the layer calls is
shared. The user's NNX model must be left exactly as it was, also when quantizing fails.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nets import random_array

import rapq_jax
from rapq_jax import adapter, config, quantized
from rapq_jax.network import network_apply

HW = 8
SMALL = dict(weight_iters=10, act_iters=5, exp_warm_iters=5, batch_size=8, search_samples=8)


def _images(n=24):
  return jnp.asarray(np.random.default_rng(1).normal(size=(n, HW, HW, 3)), jnp.float32)


def _random_model(build) -> nnx.Module:
  """``build(rngs)`` with random kernels and BatchNorm statistics (not the trivial initial
  ones). It is built abstractly (``nnx.eval_shape``) so that no initializer is compiled."""
  model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      var.set_value(random_array(str(path[-1]), var.shape, rng))
  return model


def _conv(cin, cout, k, stride=1, groups=1, *, rngs):
  return nnx.Conv(cin, cout, (k, k), stride, padding=k // 2, feature_group_count=groups,
                  use_bias=False, rngs=rngs)


# ResNet: basic blocks with identity or 1x1-conv shortcuts, in a list.

class BasicBlock(nnx.Module):
  def __init__(self, cin, cout, stride, *, rngs):
    self.conv1 = _conv(cin, cout, 3, stride, rngs=rngs)
    self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
    if stride != 1 or cin != cout:
      self.down = _conv(cin, cout, 1, stride, rngs=rngs)
      self.down_bn = nnx.BatchNorm(cout, rngs=rngs)
    else:
      self.down = self.down_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.down is None else self.down_bn(self.down(x))
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  def __init__(self, widths=(4, 8), *, rngs):
    self.stem = _conv(3, 4, 3, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
    blocks, cin = [], 4
    for w in widths:
      blocks.append(BasicBlock(cin, w, 1 if w == cin else 2, rngs=rngs))
      cin = w
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


class LinenBasicBlock(nn.Module):
  cout: int
  stride: int

  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(use_running_average=True, name=name)
    conv = lambda c, k, s, name: nn.Conv(c, (k, k), s, padding=k // 2, use_bias=False,
                                         name=name)
    y = nn.relu(bn("bn1")(conv(self.cout, 3, self.stride, "conv1")(x)))
    y = bn("bn2")(conv(self.cout, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.cout:
      x = bn("down_bn")(conv(self.cout, 1, self.stride, "down")(x))
    return nn.relu(x + y)


class LinenResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(x))
    x = LinenBasicBlock(4, 1, name="blocks_0")(x)
    x = LinenBasicBlock(8, 2, name="blocks_1")(x)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


# MobileNetV2: inverted residuals as nnx.Sequential, depthwise convs.

class InvertedResidual(nnx.Module):
  def __init__(self, cin, cout, stride, expand, *, rngs):
    hidden = cin * expand
    layers = []
    if expand != 1:
      layers += [_conv(cin, hidden, 1, rngs=rngs), nnx.BatchNorm(hidden, rngs=rngs), nnx.relu6]
    layers += [_conv(hidden, hidden, 3, stride, groups=hidden, rngs=rngs),
               nnx.BatchNorm(hidden, rngs=rngs), nnx.relu6,
               _conv(hidden, cout, 1, rngs=rngs), nnx.BatchNorm(cout, rngs=rngs)]
    self.conv = nnx.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


class MobileNet(nnx.Module):
  """Stem, an expanding residual block, a stride-2 block without expansion, classifier."""
  SETTING = ((4, 1, 2), (8, 2, 1))   # (out channels, stride, expansion) per block

  def __init__(self, *, rngs):
    self.stem = nnx.Sequential(_conv(3, 4, 3, rngs=rngs), nnx.BatchNorm(4, rngs=rngs),
                               nnx.relu6)
    self.blocks = nnx.List([InvertedResidual(cin, cout, s, t, rngs=rngs) for cin, (cout, s, t)
                            in zip((4, 4), self.SETTING)])
    self.classifier = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.classifier(jnp.mean(x, axis=(1, 2)))


class LinenConvBN(nn.Module):
  """Linen for an nnx.Sequential of conv, BatchNorm[, relu6] triples: layers_<index>."""
  convs: tuple   # (features, kernel, stride, groups, relu6) per conv

  @nn.compact
  def __call__(self, x):
    i = 0
    for c, k, s, g, act in self.convs:
      x = nn.Conv(c, (k, k), s, padding=k // 2, feature_group_count=g, use_bias=False,
                  name=f"layers_{i}")(x)
      x = nn.BatchNorm(use_running_average=True, name=f"layers_{i + 1}")(x)
      x, i = (nn.relu6(x), i + 3) if act else (x, i + 2)
    return x


class LinenInvertedResidual(nn.Module):
  cout: int
  stride: int
  expand: int

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1] * self.expand
    convs = ((hidden, 1, 1, 1, True),) if self.expand != 1 else ()
    convs += ((hidden, 3, self.stride, hidden, True), (self.cout, 1, 1, 1, False))
    y = LinenConvBN(convs, name="conv")(x)
    return x + y if self.stride == 1 and x.shape[-1] == self.cout else y


class LinenMobileNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = LinenConvBN(((4, 3, 1, 1, True),), name="stem")(x)
    for i, (cout, s, t) in enumerate(MobileNet.SETTING):
      x = LinenInvertedResidual(cout, s, t, name=f"blocks_{i}")(x)
    return nn.Dense(10, name="classifier")(jnp.mean(x, axis=(1, 2)))


def _twin_variables(model: nnx.Module) -> dict:
  """The NNX model's variables as its linen twin holds them: a list index joins the
  list's name (blocks/0/conv1 -> blocks_0/conv1, conv/layers/3 -> conv/layers_3)."""
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      keys = []
      for part in map(str, path):
        if part.isdigit():
          keys[-1] += f"_{part}"
        else:
          keys.append(part)
      node = out.setdefault("params" if isinstance(var, nnx.Param) else "batch_stats", {})
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = var[...]
  return out


TWINS = {"resnet": (ResNet, LinenResNet, ["stem", "blocks.0", "blocks.1", "head"]),
         "mobilenet": (MobileNet, LinenMobileNet,
                       ["stem", "blocks.0", "blocks.1", "classifier"])}


def _snapshot(model: nnx.Module):
  return nnx.graphdef(model), jax.tree.map(np.array, nnx.state(model))


def _assert_unchanged(model: nnx.Module, snapshot):
  """The model's variables and static attributes are as in ``snapshot``, and the Module
  classes' ``__call__`` are their own again."""
  graphdef, state = snapshot
  assert nnx.graphdef(model) == graphdef
  chex.assert_trees_all_equal(nnx.state(model), state)
  assert all(vars(cls)["__call__"] is fun for cls, fun in _CALLS.items())


def _structure(unit):
  return (unit.kind, unit.shortcut, unit.activation, unit.maxpool, unit.acts,
          [(l.role, l.stride, l.groups, l.dense) for l in unit.layers])


@pytest.mark.slow(seconds=23)
@pytest.mark.parametrize("arch", sorted(TWINS))
def test_nnx_model_quantizes_as_its_linen_twin(arch):
  nnx_cls, twin_cls, unit_names = TWINS[arch]
  model = _random_model(lambda rngs: nnx_cls(rngs=rngs))
  model.eval()
  twin, variables = twin_cls(), _twin_variables(model)
  images = _images()
  np.testing.assert_allclose(model(images), twin.apply(variables, images), rtol=1e-5, atol=1e-5)
  before = _snapshot(model)
  cfg = config.for_method("rapq", **SMALL)
  ours = rapq_jax.quantize(model, images, cfg, progress=False)
  _assert_unchanged(model, before)
  theirs = rapq_jax.quantize(twin, variables, images, cfg, progress=False)
  assert [u.name for u in ours.model.units] == unit_names       # attribute paths
  assert [_structure(u) for u in ours.model.units] == [_structure(u) for u in theirs.model.units]
  for a, b in zip(ours.model.units, theirs.model.units):
    chex.assert_trees_all_equal(ours.model.weights[a.name], theirs.model.weights[b.name])
    chex.assert_trees_all_equal(ours.model.acts[a.name], theirs.model.acts[b.name])
  chex.assert_trees_all_equal(ours.apply(images), theirs.apply(images))
  quantized.check_power_of_two(ours.model)


class Stage(nnx.Module):
  def __init__(self, cin, cout, *, rngs):
    self.blocks = nnx.data([BasicBlock(cin, cout, 1 if cin == cout else 2, rngs=rngs),
                            BasicBlock(cout, cout, 1, rngs=rngs)])   # a Python list

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class StagedResNet(nnx.Module):
  """Blocks in stages: the default units would be whole stages."""

  def __init__(self, *, rngs):
    self.stem = _conv(3, 4, 3, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.stages = nnx.List([Stage(4, 4, rngs=rngs), Stage(4, 8, rngs=rngs)])
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for stage in self.stages:
      x = stage(x)
    return self.head(x.mean(axis=(1, 2)))


def test_unit_patterns_select_nested_nnx_blocks():
  model = _random_model(lambda rngs: StagedResNet(rngs=rngs))
  model.eval()
  images = _images(8)
  with pytest.raises(adapter.UnsupportedModelError, match="unit 'stages.0' has 4 convs"):
    adapter.read_model(model, images)
  net = adapter.read_model(model, images, unit_patterns=("stages/*/blocks/*",))
  assert [u.name for u in net.units] == ["stem", "stages.0.blocks.0", "stages.0.blocks.1",
                                         "stages.1.blocks.0", "stages.1.blocks.1", "head"]
  assert [u.kind for u in net.units] == ["conv", "basic", "basic", "basic", "basic", "head"]
  np.testing.assert_allclose(network_apply(net, images), model(images), rtol=1e-5, atol=1e-4)


class NormBlock(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = _conv(8, 8, 3, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm(self.conv(x)))


class StridedSameBlock(nnx.Module):
  def __init__(self, *, rngs):
    self.down = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)   # padding 'SAME'

  def __call__(self, x):
    return nnx.relu(self.down(x))


class MixerBlock(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = _conv(8, 8, 3, rngs=rngs)
    self.mixer = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.mixer(nnx.relu(self.conv(x)))


class OneBlockNet(nnx.Module):
  """Stem conv and BatchNorm, one block of the given class in a list, classifier."""

  def __init__(self, block_cls, *, rngs):
    self.stem = _conv(3, 8, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.blocks = nnx.List([block_cls(rngs=rngs)])
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("block_cls, eval_mode, match", [
    (NormBlock, True, "unsupported layer 'blocks/0/norm' of type LayerNorm"),
    (StridedSameBlock, True, r"conv 'blocks/0/down'.*padding \[\(0, 1\), \(0, 1\)\]"),
    (MixerBlock, True, "dense layer 'blocks/0/mixer'"),
    (MixerBlock, False, r"updates its variable 'bn/mean' \(BatchStat\).*model.eval\(\)"),
])
def test_unsupported_nnx_models_are_named_and_left_unchanged(block_cls, eval_mode, match):
  model = _random_model(lambda rngs: OneBlockNet(block_cls, rngs=rngs))
  if eval_mode:
    model.eval()
  before = _snapshot(model)
  with pytest.raises(adapter.UnsupportedModelError, match=match):
    rapq_jax.quantize(model, _images(), config.for_method("rapq", **SMALL), progress=False)
  _assert_unchanged(model, before)


class DelegatingBlock(BasicBlock):
  """A subclass whose ``__call__`` calls its base's: both classes' ``__call__`` get wrapped."""

  def __call__(self, x):
    return super().__call__(x)


def test_block_delegating_to_its_base_call_is_read():
  model = _random_model(
      lambda rngs: OneBlockNet(lambda rngs: DelegatingBlock(8, 8, 1, rngs=rngs), rngs=rngs))
  model.eval()
  images = _images(8)
  net = adapter.read_model(model, images)
  assert [(u.name, u.kind) for u in net.units] == [("stem", "conv"), ("blocks.0", "basic"),
                                                    ("head", "head")]
  np.testing.assert_allclose(network_apply(net, images), model(images), rtol=1e-5, atol=1e-4)


class FailingNet(nnx.Module):
  """Updates its BatchNorm statistics (training mode), then raises."""

  def __init__(self, *, rngs):
    self.conv = _conv(3, 4, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    self.bn(self.conv(x))
    raise RuntimeError("the user's forward failed")


def test_failing_forward_leaves_the_model_and_classes_unchanged():
  model = _random_model(lambda rngs: FailingNet(rngs=rngs))
  before = _snapshot(model)
  with pytest.raises(RuntimeError, match="the user's forward failed"):
    adapter.read_model(model, _images(8))
  _assert_unchanged(model, before)


def test_variables_are_not_passed_for_nnx_models():
  model = _random_model(lambda rngs: OneBlockNet(NormBlock, rngs=rngs))
  with pytest.raises(TypeError, match="holds its own variables"):
    rapq_jax.quantize(model, nnx.state(model), _images())


# The __call__ functions of every Module class used here, as defined (see _assert_unchanged).
_CALLS = {cls: vars(cls)["__call__"] for cls in (
    nnx.Conv, nnx.BatchNorm, nnx.Linear, nnx.LayerNorm, nnx.Sequential, BasicBlock, ResNet,
    InvertedResidual, MobileNet, Stage, StagedResNet, NormBlock, StridedSameBlock, MixerBlock,
    OneBlockNet, DelegatingBlock, FailingNet)}
