"""Specification of quantizing a user's own linen model (rapq_jax.adapter).

The models below are written the way users write Flax code (``@nn.compact`` with
automatic names, or ``setup`` with attribute names), not with ``rapq_jax.models``. Read by
interception, each must fold into the same network as the built-in model of the same
architecture and weights, and quantize to the same integers; what cannot be read gets
an ``UnsupportedModelError`` naming the module path.
"""
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import folded, random_variables

import rapq_jax
from rapq_jax import adapter, config, integer, ptq, quantized
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.models.mobilenetv2 import MobileNetV2
from rapq_jax.network import network_apply

HW = 16
SMALL = dict(weight_iters=30, act_iters=10, exp_warm_iters=10, batch_size=8, search_samples=32)
MOBILE_SETTING = ((1, 8, 1, 1), (2, 16, 2, 2))


def _bn():
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5)


class ResBlock(nn.Module):
  """A user's CIFAR basic block: automatic names, option-A shortcut."""
  cin: int
  cout: int
  stride: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.cout, (3, 3), self.stride, padding=1, use_bias=False)(x)
    y = nn.relu(_bn()(y))
    y = _bn()(nn.Conv(self.cout, (3, 3), padding=1, use_bias=False)(y))
    if self.stride != 1 or self.cin != self.cout:
      pad = (self.cout - self.cin) // 2
      x = jnp.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (pad, self.cout - self.cin - pad)))
    return nn.relu(y + x)


class UserResNet(nn.Module):
  """Stem conv and BN at top level, ReLU in the parent's code, one block per stage."""
  stages: tuple = ((16, 1), (32, 2), (64, 2))

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
    cin = 16
    for width, stride in self.stages:
      x = ResBlock(cin, width, stride)(x)
      cin = width
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class InvRes(nn.Module):
  """A user's MobileNetV2 block written with ``setup``."""
  cin: int
  cout: int
  stride: int
  expand: int

  def setup(self):
    hidden = self.cin * self.expand
    if self.expand != 1:
      self.pw = nn.Conv(hidden, (1, 1), use_bias=False)
      self.pw_bn = _bn()
    self.dw = nn.Conv(hidden, (3, 3), self.stride, padding=1, feature_group_count=hidden,
                      use_bias=False)
    self.dw_bn = _bn()
    self.proj = nn.Conv(self.cout, (1, 1), use_bias=False)
    self.proj_bn = _bn()

  def __call__(self, x):
    y = nn.relu6(self.pw_bn(self.pw(x))) if self.expand != 1 else x
    y = self.proj_bn(self.proj(nn.relu6(self.dw_bn(self.dw(y)))))
    return x + y if self.stride == 1 and self.cin == self.cout else y


class UserMobileNet(nn.Module):
  """Stem, inverted residuals from a (t, c, n, s) table, 1x1 conv, pooled classifier."""

  def setup(self):
    self.stem = nn.Conv(8, (3, 3), 2, padding=1, use_bias=False)
    self.stem_bn = _bn()
    blocks, cin = [], 8
    for t, c, n, s in MOBILE_SETTING:
      for i in range(n):
        blocks.append(InvRes(cin, c, s if i == 0 else 1, t))
        cin = c
    self.blocks = blocks
    self.last = nn.Conv(32, (1, 1), use_bias=False)
    self.last_bn = _bn()
    self.head = nn.Dense(10)

  def __call__(self, x):
    x = nn.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = nn.relu6(self.last_bn(self.last(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def _leafs(tree, prefix=()):
  """{path tuple: array} of a nested dict."""
  out = {}
  for k, v in tree.items():
    out.update(_leafs(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def _nest(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _translate(builtin_vars, mapping):
  """User-model variables from built-in ones through {built-in module path: user path}."""
  flat = {}
  for col, tree in builtin_vars.items():
    for path, v in _leafs(tree).items():
      flat[(col,) + mapping["/".join(path[:-1])] + (path[-1],)] = v
  return _nest(flat)


def _resnet_mapping():
  m = {"conv1": ("Conv_0",), "bn1": ("BatchNorm_0",), "linear": ("Dense_0",)}
  for s in range(3):
    for built, user in (("conv1", "Conv_0"), ("bn1", "BatchNorm_0"), ("conv2", "Conv_1"),
                        ("bn2", "BatchNorm_1")):
      m[f"layer{s + 1}_0/{built}"] = (f"ResBlock_{s}", user)
  return m


def _mobilenet_mapping():
  m = {"features_0/0": ("stem",), "features_0/1": ("stem_bn",),
       "features_4/0": ("last",), "features_4/1": ("last_bn",), "classifier_1": ("head",)}
  m.update({"features_1/conv_0_0": ("blocks_0", "dw"), "features_1/conv_0_1": ("blocks_0", "dw_bn"),
            "features_1/conv_1": ("blocks_0", "proj"), "features_1/conv_2": ("blocks_0", "proj_bn")})
  for k in (2, 3):
    b = f"blocks_{k - 1}"
    m.update({f"features_{k}/conv_0_0": (b, "pw"), f"features_{k}/conv_0_1": (b, "pw_bn"),
              f"features_{k}/conv_1_0": (b, "dw"), f"features_{k}/conv_1_1": (b, "dw_bn"),
              f"features_{k}/conv_2": (b, "proj"), f"features_{k}/conv_3": (b, "proj_bn")})
  return m


CASES = {
    "compact_resnet": (lambda: CifarResNet(num_blocks=1), UserResNet, _resnet_mapping),
    "setup_mobilenet": (lambda: MobileNetV2(num_classes=10, setting=MOBILE_SETTING,
                                            stem_planes=8, last_planes=32),
                        UserMobileNet, _mobilenet_mapping),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
  return _pair(request.param)


def _pair(case):
  """(built-in Network, user model, user variables, images) with the same weights."""
  builtin_fn, user_cls, mapping = CASES[case]
  builtin = builtin_fn()
  variables = random_variables(builtin, HW)
  net = folded(builtin, variables, HW)
  user_vars = _translate(variables, mapping())
  images = jax.random.normal(jax.random.PRNGKey(0), (64, HW, HW, 3), jnp.float32)
  return net, user_cls(), user_vars, images


def test_user_model_folds_like_the_builtin_model(pair):
  net, model, variables, images = pair
  read = adapter.read_model(model, variables, images)
  assert len(read.units) == len(net.units)
  for ours, theirs in zip(read.units, net.units):
    assert (ours.kind, ours.shortcut, ours.activation, ours.maxpool, ours.acts) == \
        (theirs.kind, theirs.shortcut, theirs.activation, theirs.maxpool, theirs.acts)
    assert [(l.role, l.stride, l.groups, l.dense) for l in ours.layers] == \
        [(l.role, l.stride, l.groups, l.dense) for l in theirs.layers]
    chex.assert_trees_all_equal(read.params[ours.name], net.params[theirs.name])
    chex.assert_trees_all_equal(read.bn_targets[ours.name], net.bn_targets[theirs.name])
  np.testing.assert_allclose(network_apply(read, images[:8]), model.apply(variables, images[:8]),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.slow(seconds=15)
def test_user_model_quantizes_to_the_builtin_integers():
  """End to end on the ResNet pair (equal networks quantize equally, so one case suffices)."""
  net, model, variables, images = _pair("compact_resnet")
  cfg = config.for_method("rapq", **SMALL)
  ours = adapter.quantize(model, variables, images, cfg, progress=False)
  theirs = ptq.quantize_network(net, images, cfg, progress=False)
  for a, b in zip(ours.model.units, theirs.model.units):
    chex.assert_trees_all_equal(ours.model.weights[a.name], theirs.model.weights[b.name])
    chex.assert_trees_all_equal(ours.model.acts[a.name], theirs.model.acts[b.name])
  chex.assert_trees_all_equal(ours.apply(images[:8]), theirs.apply(images[:8]))
  quantized.check_power_of_two(ours.model)
  # The user's model deploys like any other: integer-only inference equals the simulation.
  program = integer.lower(ours.model)
  chex.assert_trees_all_equal(integer.apply(program, images[:8]), ours.apply(images[:8]))


class Stage(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = ResBlock(x.shape[-1], w, 2 if w != x.shape[-1] else 1)(x)
    return x


class StagedNet(nn.Module):
  """Blocks nested in stages: the default top-level units would hold 4 convs each."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_bn()(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
    x = Stage((16, 16))(x)
    x = Stage((32, 32))(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_unit_patterns_select_nested_blocks():
  images = jax.random.normal(jax.random.PRNGKey(0), (8, HW, HW, 3), jnp.float32)
  model = StagedNet()
  variables = random_variables(model, HW, init_kwargs={})
  with pytest.raises(adapter.UnsupportedModelError, match="Stage_0"):
    adapter.read_model(model, variables, images)
  net = adapter.read_model(model, variables, images, unit_patterns=("Stage_*/ResBlock_*",))
  assert [u.name for u in net.units] == ["Conv_0", "Stage_0.ResBlock_0", "Stage_0.ResBlock_1",
                                         "Stage_1.ResBlock_0", "Stage_1.ResBlock_1", "Dense_0"]
  assert [u.kind for u in net.units] == ["conv", "basic", "basic", "basic", "basic", "head"]
  np.testing.assert_allclose(network_apply(net, images), model.apply(variables, images),
                             rtol=1e-5, atol=1e-4)


class WithLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding=1)(x))
    x = nn.LayerNorm(name="norm")(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class TrainModeBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), padding=1)(x)))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class StridedSame(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="down")(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class DenseInside(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), padding=1)(x))
    x = nn.Dense(8, name="mixer")(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("model, match", [
    (WithLayerNorm(), "unsupported layer 'norm' of type LayerNorm"),
    (TrainModeBN(), "inference mode.*'train': False"),
    (StridedSame(), r"conv 'down'.*padding \[\(0, 1\), \(0, 1\)\]"),
    (DenseInside(), "dense layer 'mixer'"),
])
def test_unsupported_models_are_named(model, match):
  images = jax.random.normal(jax.random.PRNGKey(0), (8, HW, HW, 3), jnp.float32)
  variables = random_variables(model, HW, init_kwargs={})
  with pytest.raises(adapter.UnsupportedModelError, match=match):
    adapter.read_model(model, variables, images)


def test_train_mode_model_reads_with_apply_kwargs():
  images = jax.random.normal(jax.random.PRNGKey(0), (8, HW, HW, 3), jnp.float32)
  model = TrainModeBN()
  variables = random_variables(model, HW, init_kwargs={})
  net = adapter.read_model(model, variables, images, apply_kwargs={"train": False})
  np.testing.assert_allclose(network_apply(net, images), model.apply(variables, images, False),
                             rtol=1e-5, atol=1e-4)


def test_non_flax_models_are_refused():
  with pytest.raises(TypeError, match="flax.linen or flax.nnx Module, got function"):
    adapter.read_model(lambda x: x, {}, jnp.zeros((1, HW, HW, 3)))


@pytest.mark.parametrize("images, match", [
    (jnp.zeros((HW, HW, 3)), "shape"),
    (jnp.zeros((2, HW, HW, 3), jnp.uint8), "dtype"),
])
def test_bad_images_are_named(images, match):
  model = UserResNet()
  with pytest.raises(ValueError, match=match):
    adapter.read_model(model, {}, images)


def test_bad_calibration_and_weights_are_named_before_reading_the_model():
  """NaN in a calibration image or a weight, NCHW images, an empty set: errors that say
  so, not an UnsupportedModelError or a Flax shape error."""
  model = UserResNet()
  variables = random_variables(model, HW, init_kwargs={})
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8, HW, HW, 3), jnp.float32))
  nan = images.copy()
  nan[6, 1, 2, 0] = np.nan
  kernel = np.asarray(variables["params"]["ResBlock_0"]["Conv_1"]["kernel"]).copy()
  kernel[1, 2, 0, 5] = np.inf
  bad_weights = jax.tree.map(lambda a: a, variables)
  bad_weights["params"]["ResBlock_0"]["Conv_1"]["kernel"] = kernel
  cases = [
      (variables, nan, r"image 6 has a non-finite value nan at pixel \(h=1, w=2, c=0\)"),
      (bad_weights, images, r"model variables: tensor 'params/ResBlock_0/Conv_1/kernel' "
                            r"\(shape \(3, 3, 16, 16\)\) has 1 non-finite value\(s\), the first "
                            r"inf at index \(1, 2, 0, 5\)"),
      (variables, images.transpose(0, 3, 1, 2), r"shape\[1\] = 3 looks like channels-first \(NCHW\)"),
      (variables, images[:0], "holds no image"),
  ]
  for v, x, match in cases:
    with pytest.raises(ValueError, match=match) as err:
      rapq_jax.quantize(model, v, x, config.for_method("naive"), progress=False)
    assert not isinstance(err.value, adapter.UnsupportedModelError)


@pytest.mark.parametrize("example", [0, 1], ids=["linen", "nnx"])
@pytest.mark.slow(seconds=14)
def test_readme_example_runs(example):
  """The README's own-model examples, verbatim except for a smaller iteration budget and
  fewer, smaller calibration images."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = text.split("## Quantize your own Flax model", 1)[1].split("\n## ", 1)[0]
  code = section.split("```python\n")[1 + example].split("```", 1)[0]
  smaller = {"weight_iters=2000, act_iters=500":
                 "weight_iters=20, act_iters=5, exp_warm_iters=5, search_samples=8",
             "(512, 32, 32, 3)": "(40, 16, 16, 3)"}
  for verbatim, small in smaller.items():
    assert verbatim in code
    code = code.replace(verbatim, small)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (8, 10)
  assert len(namespace["result"].model.units) == 4
