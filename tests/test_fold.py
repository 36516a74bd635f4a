"""Specification of rapq_jax.fold (BN folding) and rapq_jax.network (the folded forward).

A folded ``Network`` computes the same logits as the Flax model in inference mode; its
units follow the model's blocks; ``bn`` keeps the statistics each folded layer's output
should have (``mean = beta``, ``var = g**2 v / (v + eps)``) and the BN scale.
"""
import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nets import folded
from rapq_jax import fold
from rapq_jax.models import get_model
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.network import Network, unit_apply, network_apply

HYPOTHESIS = settings(max_examples=30, deadline=None)


def random_variables(model, hw: int, seed: int = 0) -> dict:
  """He-scaled random kernels and randomized BN scales, biases and running statistics
  for ``model`` on [hw, hw, 3] images, without running ``model.init``."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['kernel']"):
      fan_in = np.prod(shape[:-1])
      std = np.sqrt(2.0 / fan_in) if len(shape) == 4 else np.sqrt(1.0 / fan_in)
      a = rng.normal(size=shape) * std
    elif name.endswith("['scale']"):
      a = rng.uniform(0.5, 1.5, size=shape)
    elif name.endswith("['mean']"):
      a = rng.normal(size=shape) * 0.3
    elif name.endswith("['var']"):
      a = rng.uniform(0.3, 3.0, size=shape)
    else:  # biases
      a = rng.normal(size=shape) * 0.2
    return jnp.asarray(a, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def networks():
  """name -> (model, variables, folded network, image size), built once per module."""
  cache = {}

  def get(name, hw):
    if name not in cache:
      model = CifarResNet(num_blocks=1) if name == "cifar_resnet8" else get_model(name)
      variables = random_variables(model, hw)
      cache[name] = (model, variables, folded(model, variables, hw), hw)
    return cache[name]

  return get


@pytest.mark.parametrize("name, hw", [("cifar_resnet20", 32), ("cifar_resnet8", 16),
                                      ("resnet18", 32), ("mobilenetv2", 32)])
def test_folded_network_matches_model(networks, name, hw):
  model, variables, net, _ = networks(name, hw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 3), jnp.float32)
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = jax.jit(network_apply)(net, x)
  chex.assert_equal_shape([got, expected])
  chex.assert_type(got, jnp.float32)
  assert float(jnp.std(expected)) > 1e-2          # not a degenerate network
  scale = float(jnp.max(jnp.abs(expected)))
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


def test_folded_params_and_targets_are_float32_and_shaped(networks):
  _, variables, net, _ = networks("cifar_resnet20", 32)
  for unit in net.units:
    for layer in unit.layers:
      p = net.params[unit.name][layer.role]
      chex.assert_type([p["kernel"], p["bias"]], jnp.float32)
      out = p["kernel"].shape[-1]
      chex.assert_shape(p["bias"], (out,))
      if layer.dense:
        assert layer.role not in net.bn_targets[unit.name]
      else:
        t = net.bn_targets[unit.name][layer.role]
        chex.assert_shape([t["mean"], t["var"], t["gamma"]], (out,))
  # conv1 of the stem: targets are exactly the formula on the model's own BN.
  bn, stats = variables["params"]["bn1"], variables["batch_stats"]["bn1"]
  t = net.bn_targets["conv1"]["conv"]
  np.testing.assert_array_equal(t["mean"], bn["bias"])
  np.testing.assert_array_equal(t["gamma"], bn["scale"])
  np.testing.assert_allclose(
      t["var"], bn["scale"] ** 2 * stats["var"] / (stats["var"] + fold.BN_EPS), rtol=1e-6)


# ------------------------------------------------------------------ fold_bn

@st.composite
def bn_problems(draw):
  c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  f = lambda lo, hi: st.floats(lo, hi, width=32)
  arr = lambda shape, lo, hi: draw(hnp.arrays(np.float32, shape, elements=f(lo, hi)))
  kernel = arr((3, 3, c_in, c_out), -2, 2)
  bias = arr((c_out,), -1, 1) if draw(st.booleans()) else None
  bn_params = {"scale": arr((c_out,), -2, 2), "bias": arr((c_out,), -1, 1)}
  bn_stats = {"mean": arr((c_out,), -1, 1), "var": arr((c_out,), 0, 4)}
  x = arr((2, 5, 5, c_in), -2, 2)
  return kernel, bias, bn_params, bn_stats, x


def conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@given(problem=bn_problems())
@HYPOTHESIS
def test_fold_bn_output_equals_bn_of_conv(problem):
  kernel, bias, bn_params, bn_stats, x = problem
  k, b, targets = fold.fold_bn(kernel, bias, bn_params, bn_stats)
  chex.assert_equal_shape([k, kernel])
  chex.assert_shape(b, (kernel.shape[-1],))
  y = conv(x, kernel) + (0.0 if bias is None else bias)
  bn_y = (bn_params["scale"] * (y - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + fold.BN_EPS)
          + bn_params["bias"])
  # Tolerance relative to the magnitudes summed by the conv.
  mag = conv(jnp.abs(x), jnp.abs(k)) + 1.0
  assert np.all(np.abs(conv(x, k) + b - bn_y) <= 1e-4 * mag)


@given(problem=bn_problems())
@HYPOTHESIS
def test_fold_bn_targets(problem):
  kernel, bias, bn_params, bn_stats, _ = problem
  _, _, targets = fold.fold_bn(kernel, bias, bn_params, bn_stats)
  assert set(targets) == {"mean", "var", "gamma"}
  g, v = bn_params["scale"].astype(np.float64), bn_stats["var"].astype(np.float64)
  np.testing.assert_array_equal(targets["mean"], bn_params["bias"])
  np.testing.assert_array_equal(targets["gamma"], bn_params["scale"])
  np.testing.assert_allclose(targets["var"], g ** 2 * v / (v + fold.BN_EPS), rtol=1e-5, atol=1e-12)
  assert np.all(np.asarray(targets["var"]) >= 0)


def test_fold_bn_dense_kernel_scales_output_channels():
  kernel = jnp.ones((3, 2))
  k, b, _ = fold.fold_bn(kernel, jnp.array([1.0, 2.0]), {"scale": jnp.array([2.0, -1.0]),
                                                          "bias": jnp.array([0.5, 0.0])},
                         {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([4.0, 1.0])}, eps=0.0)
  np.testing.assert_allclose(k, [[1.0, -1.0]] * 3)
  np.testing.assert_allclose(b, [0.5, -2.0])


# ------------------------------------------------------------------ unit structure

def summary(net):
  return [(u.name, u.kind, u.shortcut, tuple((l.role, l.stride) for l in u.layers))
          for u in net.units]


def test_cifar_resnet20_units(networks):
  _, _, net, _ = networks("cifar_resnet20", 32)
  basic = lambda name, s, shortcut: (name, "basic", shortcut, (("conv1", s), ("conv2", 1)))
  assert summary(net) == [
      ("conv1", "conv", "none", (("conv", 1),)),
      basic("layer1_0", 1, "identity"), basic("layer1_1", 1, "identity"),
      basic("layer1_2", 1, "identity"),
      basic("layer2_0", 2, "option_a"), basic("layer2_1", 1, "identity"),
      basic("layer2_2", 1, "identity"),
      basic("layer3_0", 2, "option_a"), basic("layer3_1", 1, "identity"),
      basic("layer3_2", 1, "identity"),
      ("linear", "head", "none", (("fc", 1),)),
  ]
  assert [u.name for u in net.units] == [u.name for u in net.units]
  stem, head = net.units[0], net.units[-1]
  assert [(a.name, a.signed) for a in stem.acts] == [("input", True), ("out", False)]
  assert not stem.maxpool and head.layers[0].dense and head.acts == ()
  for unit in net.units[1:-1]:
    assert [(a.name, a.signed) for a in unit.acts] == [("relu1", False), ("out", False)]
    assert unit.last_bn_layer == "conv2" and unit.activation == "relu"
  assert [l.path for l in net.units[4].layers] == ["layer2_0/conv1", "layer2_0/conv2"]


def test_mobilenetv2_units(networks):
  _, _, net, _ = networks("mobilenetv2", 32)
  names = [u.name for u in net.units]
  assert names == [f"features_{i}" for i in range(19)] + ["classifier_1"]
  assert [u.kind for u in net.units] == ["conv"] + ["inverted"] * 17 + ["conv", "head"]
  blocks = net.units[1:18]
  assert [u.layer("dw").stride for u in blocks] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
  identity = {3, 5, 6, 8, 9, 10, 12, 13, 15, 16}
  assert [u.shortcut for u in blocks] == ["identity" if i in identity else "none"
                                          for i in range(1, 18)]
  assert [l.role for l in blocks[0].layers] == ["dw", "project"]
  assert [a.name for a in blocks[0].acts] == ["relu2", "out"]
  for unit in blocks[1:]:
    assert [l.role for l in unit.layers] == ["expand", "dw", "project"]
    assert [(a.name, a.signed) for a in unit.acts] == [("relu1", False), ("relu2", False),
                                                      ("out", True)]
  for unit in blocks:
    dw = unit.layer("dw")
    assert dw.groups == net.params[unit.name]["dw"]["kernel"].shape[-1]
    assert net.params[unit.name]["dw"]["kernel"].shape[2] == 1
    assert unit.activation == "relu6" and unit.last_bn_layer == "project"
  stem = net.units[0]
  assert stem.layer("conv").stride == 2 and stem.acts[0].name == "input"
  assert net.units[-1].layer("fc").dense


def test_resnet18_units(networks):
  _, _, net, _ = networks("resnet18", 32)
  assert net.units[0].maxpool and net.units[0].layer("conv").stride == 2
  shortcuts = [(u.name, u.shortcut, u.layer("conv1").stride) for u in net.units[1:-1]]
  assert shortcuts == [("layer1_0", "identity", 1), ("layer1_1", "identity", 1),
                       ("layer2_0", "conv", 2), ("layer2_1", "identity", 1),
                       ("layer3_0", "conv", 2), ("layer3_1", "identity", 1),
                       ("layer4_0", "conv", 2), ("layer4_1", "identity", 1)]
  assert net.units[3].layer("shortcut").path == "layer2_0/downsample_0"


def test_unit_apply_reports_pre_activations(networks):
  _, _, net, hw = networks("cifar_resnet8", 16)
  unit = net.units[1]
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(2), (2, hw, hw, 16)))
  y, pre = unit_apply(unit, net.params[unit.name], x)
  assert set(pre) == {"conv1", "conv2"}
  chex.assert_shape([y, pre["conv1"], pre["conv2"]], (2, hw, hw, 16))
  chex.assert_trees_all_close(y, jax.nn.relu(pre["conv2"] + x), atol=1e-6)


def test_network_is_a_pytree_with_static_units(networks):
  _, _, net, _ = networks("cifar_resnet8", 16)
  leaves = jax.tree.leaves(net)
  assert all(isinstance(l, jax.Array) for l in leaves)
  doubled = jax.tree.map(lambda a: 2 * a, net)
  assert isinstance(doubled, Network) and doubled.units == net.units
