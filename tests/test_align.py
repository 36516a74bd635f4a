"""Specification of rapq_jax.align: function-preserving channel rescaling that puts the
float methods' scales on powers of two.

Rescaling a link (producer -> ReLU -> consumer) by any positive factors keeps every unit
kind's FP output, grouped and depthwise consumers included; 'weights' puts every
producer channel's Lp weight scale on an exact power of two, 'acts' every inner ReLU
point's Lp activation scale; units without a homogeneous link (ReLU6, plain convs, the
head) are left alone; the aligned network quantizes to an exact power-of-two model
whose integer program equals its simulation.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import folded, random_variables

from rapq_jax import align, config, integer, pot, ptq, quantized
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.models.mobilenetv2 import MobileNetV2
from rapq_jax.network import Network, network_apply, unit_apply
from rapq_jax.units import Layer, Unit, unit_acts

HW = 16


def _layer_params(rng, shape):
  return {"kernel": jnp.asarray(rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1])),
                                jnp.float32),
          "bias": jnp.asarray(rng.normal(size=shape[-1:]) * 0.2, jnp.float32)}


def _bn(rng, c):
  return {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
          "var": jnp.asarray(rng.uniform(0.3, 3, size=c), jnp.float32),
          "gamma": jnp.asarray(rng.uniform(0.5, 1.5, size=c), jnp.float32)}


def _single_unit(kind: str) -> Network:
  """One random unit: a bottleneck whose 3x3 conv has 2 groups, or a ReLU inverted
  residual (MnasNet's) whose depthwise conv has one group per channel."""
  rng = np.random.default_rng(3)
  if kind == "bottleneck":
    layers = (Layer("conv1", "c1"), Layer("conv2", "c2", groups=2), Layer("conv3", "c3"))
    shapes = {"conv1": (1, 1, 8, 6), "conv2": (3, 3, 3, 6), "conv3": (1, 1, 6, 8)}
    unit = Unit("u", "bottleneck", layers, unit_acts("bottleneck", ("conv1", "conv2", "conv3")),
                shortcut="identity")
  else:
    layers = (Layer("expand", "e"), Layer("dw", "d", groups=12), Layer("project", "p"))
    shapes = {"expand": (1, 1, 8, 12), "dw": (3, 3, 1, 12), "project": (1, 1, 12, 8)}
    unit = Unit("u", "inverted", layers, unit_acts("inverted", ("expand", "dw", "project")),
                shortcut="identity", activation="relu")
  params = {"u": {r: _layer_params(rng, s) for r, s in shapes.items()}}
  return Network((unit,), params, {"u": {r: _bn(rng, s[-1]) for r, s in shapes.items()}})


def _cifar() -> Network:
  model = CifarResNet(num_blocks=1)
  return folded(model, random_variables(model, HW), HW)


NETS = {"cifar_resnet": _cifar, "bottleneck_grouped": lambda: _single_unit("bottleneck"),
        "inverted_relu_depthwise": lambda: _single_unit("inverted")}


def _images(n=16, c=None, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, HW, HW, c or 3), jnp.float32)


def _input_for(net):
  first = net.units[0]
  c = net.params[first.name][first.layers[0].role]["kernel"].shape[-2] * first.layers[0].groups
  return _images(c=c)


@pytest.mark.parametrize("name", NETS)
def test_rescaling_any_link_keeps_the_function(name):
  net = NETS[name]()
  x = _input_for(net)
  rng = np.random.default_rng(0)
  moved = net
  links = [(u, l) for u in net.units for l in u.rescalable_links]
  assert links, "no rescalable link"
  for unit, (producer, _, consumer) in links:
    c = net.params[unit.name][producer]["kernel"].shape[-1]
    g = jnp.asarray(rng.uniform(0.25, 4.0, size=c), jnp.float32)
    prev, moved = moved, align.rescale_link(moved, unit.name, producer, consumer, g)
    chex.assert_trees_all_close(moved.params[unit.name][producer]["kernel"],
                                prev.params[unit.name][producer]["kernel"] * g, rtol=1e-6)
    chex.assert_trees_all_close(moved.bn_targets[unit.name][producer]["var"],
                                prev.bn_targets[unit.name][producer]["var"] * g * g, rtol=1e-6)
  out = network_apply(net, x) if net.units[-1].kind == "head" else unit_apply(
      net.units[0], net.params["u"], x)[0]
  new = network_apply(moved, x) if net.units[-1].kind == "head" else unit_apply(
      moved.units[0], moved.params["u"], x)[0]
  assert float(jnp.max(jnp.abs(out))) > 0.1
  chex.assert_trees_all_close(new, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("wbits", [2, 4])
def test_weight_alignment_puts_every_producer_scale_on_a_power_of_two(name, wbits):
  net = NETS[name]()
  new, factors = align.align(net, "weights", wbits=wbits, abits=4, weight_signed=False, p=2.4)
  assert set(factors) == {f"{u.name}/{pt}" for u in net.units for _, pt, _ in u.rescalable_links}
  prev = net     # the links are rescaled in order: a bottleneck's conv2 is consumer, then producer
  for unit in net.units:
    for producer, point, consumer in unit.rescalable_links:
      g = factors[f"{unit.name}/{point}"]
      assert np.all(g >= 2 ** -0.5 - 1e-6) and np.all(g <= 2 ** 0.5 + 1e-6)
      assert np.ptp(g) > 0.05, "per-channel factors expected"
      lp = lambda n: pot.lp_scale_search(n.params[unit.name][producer]["kernel"], wbits,
                                         signed=False, per_channel=True, p=2.4).scale
      before = lp(prev)
      prev = align.rescale_link(prev, unit.name, producer, consumer, g)
      after = lp(new)
      np.testing.assert_allclose(np.log2(after), np.round(np.log2(after)), atol=1e-5)
      np.testing.assert_allclose(after, before * g, rtol=1e-5)
  chex.assert_trees_all_equal(prev.params, new.params)


@pytest.mark.parametrize("name", NETS)
def test_act_alignment_puts_every_inner_relu_scale_on_a_power_of_two(name):
  net = NETS[name]()
  x = _input_for(net)
  new, factors = align.align(net, "acts", wbits=4, abits=4, weight_signed=False, p=2.4,
                             calib=x)
  h = x
  for unit in new.units:
    pre = unit_apply(unit, new.params[unit.name], h)[1]
    for producer, point, _ in unit.rescalable_links:
      g = np.asarray(factors[f"{unit.name}/{point}"])
      assert np.ptp(g) == 0 and 2 ** -0.5 - 1e-6 <= g[0] <= 2 ** 0.5 + 1e-6
      scale = pot.lp_scale_search(jax.nn.relu(pre[producer]), 4, signed=False,
                                  per_channel=False, p=2.4).scale
      assert abs(float(np.log2(scale)) - round(float(np.log2(scale)))) < 1e-5, (point, scale)
    h = unit_apply(unit, new.params[unit.name], h)[0]


def test_units_without_a_homogeneous_link_are_left_alone():
  """MobileNetV2 (ReLU6 everywhere): nothing to rescale, the network is returned as is."""
  model = MobileNetV2(num_classes=10, setting=((1, 8, 1, 1), (6, 8, 2, 2)), stem_planes=8,
                      last_planes=16)
  net = folded(model, random_variables(model, HW), HW)
  assert all(not u.rescalable_links for u in net.units)
  for mode in ("weights", "acts"):
    new, factors = align.align(net, mode, wbits=4, abits=4, weight_signed=False, p=2.4,
                               calib=_images(4))
    assert factors == {} and new is net


@pytest.mark.slow(seconds=14)
def test_aligned_rapq_is_power_of_two_and_integer_exact():
  """End to end on the weight alignment (the activation alignment changes only which
  network is quantized, as this one does)."""
  mode = "weights"
  net = _cifar()
  calib, x = _images(64), _images(8, seed=1)
  cfg = config.for_method("rapq", weight_iters=10, act_iters=4, batch_size=8,
                          search="none", align_scales=mode)
  result = ptq.quantize_network(net, calib, cfg, progress=False)
  quantized.check_power_of_two(result.model)
  np.testing.assert_array_equal(integer.apply(integer.lower(result.model), x),
                                quantized.apply(result.model, x))
  report = result.report["align"]
  assert report["mode"] == mode and set(report["factors"]) == {
      "layer1_0/relu1", "layer2_0/relu1", "layer3_0/relu1"}
  # The producers' exponents are the float methods' grids: 2**e equals the aligned Lp
  # scale, channel by channel.
  aligned, _ = align.align(net, mode, wbits=4, abits=4, weight_signed=False, p=cfg.scale_p)
  for unit in ("layer1_0", "layer2_0", "layer3_0"):
    lp = pot.lp_scale_search(aligned.params[unit]["conv1"]["kernel"], 4, signed=False,
                             per_channel=True, p=cfg.scale_p).scale
    np.testing.assert_allclose(pot.exp2(result.model.weights[unit]["conv1"]["e"]), lp,
                               rtol=1e-5)


def test_bad_settings_are_refused_by_name():
  with pytest.raises(ValueError, match="align_scales = 'channels'"):
    config.for_method("rapq", align_scales="channels")
  with pytest.raises(ValueError, match="needs pot_scales=True"):
    config.for_method("brecq", align_scales="weights")
  config.for_method("brecq", align_scales="equalize")       # not about powers of two
  with pytest.raises(ValueError, match="align_scales = 'equalize_stream' puts scales"):
    config.for_method("brecq", align_scales="equalize_stream")
  for mode in ("acts", "stream", "acts_stream", "weights_stream", "equalize",
               "equalize_stream"):
    with pytest.raises(ValueError, match=f"align_scales = '{mode}' needs calibration images"):
      align.align(_cifar(), mode, wbits=4, abits=4, weight_signed=False, p=2.4)


@pytest.mark.parametrize("name", ["cifar_resnet", "mobilenetv2"])
def test_stream_alignment_keeps_the_function_and_moves_the_stream_onto_the_grid(name):
  """'stream': every unit reads and writes the stream scaled by one factor g (the first
  reads the image, the last writes logits, both unscaled), the FP function is unchanged,
  and the stream's activation points are on average closer to powers of two."""
  if name == "cifar_resnet":
    net = _cifar()
  else:     # inverted residual blocks: ReLU6 inside, linear block outputs and sums; the
            # stem ends in ReLU6, so the stream starts at the first block (no sum)
    model = MobileNetV2(num_classes=10, setting=((1, 16, 1, 1), (6, 16, 2, 1)), stem_planes=8,
                        last_planes=16)
    net = folded(model, random_variables(model, HW), HW)
  x = _input_for(net)
  new, factors = align.align(net, "stream", wbits=4, abits=4, weight_signed=False, p=2.4,
                             calib=x)
  assert set(factors) == {"stream"}
  g = float(factors["stream"][0])
  assert g != 1.0 and 2 ** -0.5 - 1e-6 <= g < 2 ** 0.5
  assert abs(np.log2(g) * align.STREAM_STEPS - round(np.log2(g) * align.STREAM_STEPS)) < 1e-6
  chex.assert_trees_all_close(network_apply(new, x), network_apply(net, x), rtol=1e-4,
                              atol=1e-4)

  def distance(n):   # mean distance of the stream points' log2 Lp scales to integers
    logs, h = [], x
    for i, unit in enumerate(n.units[:-1]):
      h = unit_apply(unit, n.params[unit.name], h)[0]
      s = pot.lp_scale_search(h, 4, signed=False, per_channel=False, p=2.4).scale
      logs.append(float(np.log2(s)))
    return np.mean(np.abs(np.asarray(logs) - np.round(logs)))

  assert distance(new) < distance(net)
  if name != "cifar_resnet":               # its stem ends in ReLU6: the stream starts later
    return
  h = x
  for i, unit in enumerate(net.units):     # every unit between the ends maps g x -> g y
    y = unit_apply(unit, net.params[unit.name], h)[0]
    scaled = unit_apply(unit, new.params[unit.name], h * (1.0 if i == 0 else g))[0]
    last = i == len(net.units) - 1
    chex.assert_trees_all_close(scaled, y * (1.0 if last else g), rtol=1e-4, atol=1e-4)
    h = y


@pytest.mark.parametrize("inner", ["acts", "weights"])
def test_stream_then_inner_alignment_composes_the_two(inner):
  """'acts_stream' ('weights_stream') equals 'acts' ('weights') applied to the
  'stream'-aligned network: the same parameters and factors, the FP function unchanged."""
  net = _cifar()
  x = _input_for(net)
  kw = dict(wbits=4, abits=4, weight_signed=False, p=2.4, calib=x)
  both, factors = align.align(net, f"{inner}_stream", **kw)
  streamed, f_stream = align.align(net, "stream", **kw)
  expected, f_acts = align.align(streamed, inner, **kw)
  assert "stream" in f_stream and set(factors) == set(f_stream) | set(f_acts)
  assert len(f_acts) == sum(len(u.rescalable_links) for u in net.units) > 0
  chex.assert_trees_all_equal(both.params, expected.params)
  chex.assert_trees_all_close(network_apply(both, x), network_apply(net, x), rtol=1e-4,
                              atol=1e-4)


def test_stream_scales_refuse_a_sum_of_two_scales():
  """A basic block carries the stream (conv1 absorbs it, conv2 restores it for the sum),
  but cannot map a scaled input to an unscaled output: its sum adds the input itself."""
  unit = next(u for u in _cifar().units if u.kind == "basic")
  assert align.stream_layer_scales(unit, 2.0, 2.0)[0] == {"conv1": (2.0, 1.0),
                                                          "conv2": (1.0, 2.0)}
  assert align.stream_layer_scales(unit, 2.0, 1.0) is None   # the sum needs x at 1


def _option_a_factors(seed: int):
  """Random positive per-channel stream factors of ``_cifar()`` (stem, 16, 32 and 64
  channels, one block per stage) that its option-A shortcuts allow: a stage's factors
  are the middle of the next one's."""
  d3 = np.exp(np.random.default_rng(seed).normal(size=64))
  d2 = d3[16:48]
  d1 = d2[8:24]
  return [d1, d1, d2, d3, 1.0]


def test_per_channel_stream_factors_keep_the_function_and_follow_the_shortcuts():
  """A stream scaled channel by channel (option-A shortcuts carry a stage's factors into
  the middle of the next stage's channels) computes the FP function; factors that the
  shortcuts do not allow are refused by unit name."""
  net = _cifar()
  x = _input_for(net)
  outs = _option_a_factors(0)
  chex.assert_trees_all_close(network_apply(align.rescale_stream(net, outs)[0], x),
                              network_apply(net, x), rtol=1e-4, atol=1e-4)
  bad = list(outs)
  bad[2] = np.roll(outs[2], 1)             # layer2_0's sum would add two scales
  with pytest.raises(ValueError, match="unit 'layer2_0' cannot map"):
    align.rescale_stream(net, bad)


@pytest.mark.parametrize("name", ["cifar_resnet", "mobilenetv2"])
def test_equalize_keeps_the_function_and_ties_the_channels_that_sums_add(name):
  """'equalize': one factor per channel of every unit output the stream factor could
  scale (none for a stem ending in ReLU6), the same factors where a residual sum adds
  two values, geometric mean 1 and the FP function unchanged; '_stream' adds the
  stream factor after it."""
  if name == "cifar_resnet":
    net = _cifar()
  else:
    model = MobileNetV2(num_classes=10, setting=((1, 16, 1, 1), (6, 16, 2, 1)), stem_planes=8,
                        last_planes=16)
    net = folded(model, random_variables(model, HW), HW)
  x = _input_for(net)
  kw = dict(wbits=4, abits=4, weight_signed=False, p=2.4, calib=x)
  new, factors = align.align(net, "equalize", **kw)
  chex.assert_trees_all_close(network_apply(new, x), network_apply(net, x), rtol=1e-4,
                              atol=1e-4)
  # MobileNetV2's stem and last conv end in ReLU6: its stream runs between them.
  writers = net.units[:-1] if name == "cifar_resnet" else net.units[1:-2]
  expected = {f"{u.name}/out" for u in writers}
  assert set(factors) == expected
  logs = np.concatenate([np.log2(np.asarray(v)) for v in factors.values()])
  assert np.all(np.isfinite(logs)) and np.ptp(logs) > 0.05
  if name == "cifar_resnet":
    f = {k.removesuffix("/out"): np.asarray(v) for k, v in factors.items()}
    np.testing.assert_array_equal(f["conv1"], f["layer1_0"])          # identity sum
    np.testing.assert_array_equal(f["layer2_0"][8:24], f["layer1_0"])   # option A
    np.testing.assert_array_equal(f["layer3_0"][16:48], f["layer2_0"])
    # layer3_0's channels hold every tied group once: their geometric mean is 1.
    np.testing.assert_allclose(np.mean(np.log2(f["layer3_0"])), 0.0, atol=1e-6)
  both, f_both = align.align(net, "equalize_stream", **kw)
  expected_net, f_stream = align.align(new, "stream", **kw)
  chex.assert_trees_all_equal(both.params, expected_net.params)
  assert set(f_both) == set(factors) | set(f_stream)


def test_equalize_balances_activations_against_weights():
  """After equalization each stream channel's activation scale and largest weight are
  in one ratio (cross-layer equalization's balance), so equalizing again moves nothing:
  the second factors are 1 up to the Lp search's 1 % grid."""
  net = _cifar()
  x = _images(64, seed=2)
  kw = dict(wbits=4, abits=4, weight_signed=False, p=2.4, calib=x)
  once, first = align.align(net, "equalize", **kw)
  second = align.align(once, "equalize", **kw)[1]
  assert max(np.ptp(np.log2(np.asarray(v))) for v in first.values()) > 0.5
  for key, v in second.items():
    np.testing.assert_allclose(np.log2(np.asarray(v)), 0.0, atol=0.03, err_msg=key)


def test_equalize_undoes_a_function_preserving_channel_imbalance():
  """Equalization depends on the function, not on how its channels happen to be scaled:
  on the network with its stream scaled by arbitrary allowed factors ``d`` it finds its
  factors on the original divided by ``d``, up to one number per unit output."""
  net = _cifar()
  x = _images(64, seed=2)
  kw = dict(wbits=4, abits=4, weight_signed=False, p=2.4, calib=x)
  d = _option_a_factors(1)
  distorted = align.rescale_stream(net, d)[0]
  plain, moved = align.align(net, "equalize", **kw)[1], align.align(distorted, "equalize", **kw)[1]
  for i, unit in enumerate(net.units[:-1]):
    key = f"{unit.name}/out"
    shift = np.log2(np.asarray(moved[key])) - np.log2(np.asarray(plain[key])) + np.log2(d[i])
    np.testing.assert_allclose(shift, np.mean(shift), atol=0.03)
