"""Specification of rapq_jax.units: each unit kind is one program, and what the rest of
the library knows about a unit (its activation points, the point feeding each layer, the
rescalable links) is read off that program. A kind registered here and nowhere else is
reconstructed, simulated and lowered to integers by the existing interpreters."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from rapq_jax import units
from rapq_jax.network import Network, network_apply
from rapq_jax.units import ActPoint, Layer, Op, Unit

# (kind, roles, shortcut, activation points, {role: feeding point}, rescalable links)
CASES = [
    ("conv", ("conv",), "none", ("out",), {"conv": None}, ()),
    ("linear_conv", ("conv",), "none", ("out",), {"conv": None}, ()),
    ("basic", ("conv1", "conv2"), "identity", ("relu1", "out"),
     {"conv1": None, "conv2": "relu1"}, (("conv1", "relu1", "conv2"),)),
    ("basic", ("conv1", "conv2", "shortcut"), "conv", ("relu1", "out"),
     {"conv1": None, "conv2": "relu1", "shortcut": None}, (("conv1", "relu1", "conv2"),)),
    ("bottleneck", ("conv1", "conv2", "conv3"), "option_a", ("relu1", "relu2", "out"),
     {"conv1": None, "conv2": "relu1", "conv3": "relu2"},
     (("conv1", "relu1", "conv2"), ("conv2", "relu2", "conv3"))),
    ("inverted", ("dw", "project"), "none", ("relu2", "out"),
     {"dw": None, "project": "relu2"}, (("dw", "relu2", "project"),)),
    ("inverted", ("expand", "dw", "project"), "identity", ("relu1", "relu2", "out"),
     {"expand": None, "dw": "relu1", "project": "relu2"},
     (("expand", "relu1", "dw"), ("dw", "relu2", "project"))),
    ("head", ("fc",), "none", (), {"fc": None}, ()),
]


def _unit(kind, roles, shortcut, activation="relu", network_input=False):
  acts = units.unit_acts(kind, roles, network_input=network_input)
  return Unit("u", kind, tuple(Layer(r, r, dense=kind == "head") for r in roles), acts,
              shortcut=shortcut, activation=activation)


@pytest.mark.parametrize("kind, roles, shortcut, points, inputs, links", CASES)
def test_what_a_unit_knows_is_read_off_its_program(kind, roles, shortcut, points, inputs, links):
  unit = _unit(kind, roles, shortcut)
  assert tuple(a.name for a in unit.acts) == points
  assert units.layer_inputs(unit) == inputs
  assert unit.rescalable_links == links
  assert _unit(kind, roles, shortcut, activation="relu6").rescalable_links == ()
  # Signed where no activation precedes the quantizer: MobileNetV2's linear bottleneck.
  assert [a.signed for a in unit.acts] == [kind in ("inverted", "linear_conv") and p == "out"
                                           for p in points]


@pytest.mark.parametrize("kind, roles, shortcut", [c[:3] for c in CASES])
def test_programs_are_well_formed(kind, roles, shortcut):
  """Every value is made before it is read and once; each layer and point is used once;
  the unit output is the last value."""
  program = _unit(kind, roles, shortcut, network_input=kind == "conv").program
  made = {"x"}
  for op in program:
    assert op.op in units.OPS
    assert set(op.inputs) <= made, op
    assert op.out not in made, op
    made.add(op.out)
  linears = [op.role for op in program if op.op == "linear"]
  assert sorted(linears) == sorted(roles)
  points = [op.point for op in program if op.op == "quant"]
  assert len(points) == len(set(points))


def test_the_network_input_is_a_signed_quantizer_of_the_first_conv():
  unit = _unit("conv", ("conv",), "none", network_input=True)
  assert unit.acts == (ActPoint("input", True), ActPoint("out"))
  assert unit.program[0] == Op("quant", "@input", ("x",), point="input", signed=True)
  assert units.layer_inputs(unit) == {"conv": "input"}


@pytest.mark.parametrize("call, match", [
    (lambda: units.kind_of("vgg"), r"unknown unit kind 'vgg'; expected one of \('conv'"),
    (lambda: units.unit_acts("basic", ("conv1",)),
     r"a 'basic' unit has layer roles \('conv1', 'conv2'\) or .* not \('conv1',\)"),
    (lambda: units.register(units.KINDS["conv"]), "'conv' is already registered"),
])
def test_bad_kinds_and_roles_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------ a new kind

def _pair(s: units.Shape) -> tuple[Op, ...]:
  """A VGG-style pair: conv, activation, quantizer, conv, activation, quantizer."""
  del s
  return (Op("linear", "a", ("x",), role="conv1"), Op("act", "b", ("a",)),
          Op("quant", "c", ("b",), point="relu1"), Op("linear", "d", ("c",), role="conv2"),
          Op("act", "e", ("d",)), Op("quant", "f", ("e",), point="out"))


@pytest.fixture
def pair_kind():
  kind = units.register(units.Kind("pair", "two convs, each with an activation", _pair,
                                   bn_role="conv2", role_sets=(("conv1", "conv2"),)))
  yield kind
  del units.KINDS["pair"]


@pytest.mark.slow(seconds=20)
def test_a_kind_registered_once_is_reconstructed_simulated_and_lowered(pair_kind):
  rng = np.random.default_rng(0)

  def layer(shape):
    fan_in = np.prod(shape[:-1])
    return {"kernel": jnp.asarray(rng.normal(size=shape) * np.sqrt(2 / fan_in), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=shape[-1:]) * 0.1, jnp.float32)}

  def bn(c):
    return {"mean": jnp.zeros(c), "var": jnp.ones(c), "gamma": jnp.ones(c)}

  stem = Unit("stem", "conv", (Layer("conv", "stem"),),
              units.unit_acts("conv", ("conv",), network_input=True))
  pair = Unit("pair", pair_kind.name, (Layer("conv1", "p1", stride=2), Layer("conv2", "p2")),
              units.unit_acts(pair_kind.name, ("conv1", "conv2")))
  head = Unit("head", "head", (Layer("fc", "fc", dense=True),), (), activation="none")
  assert pair.acts == (ActPoint("relu1"), ActPoint("out"))
  assert pair.rescalable_links == (("conv1", "relu1", "conv2"),)
  params = {"stem": {"conv": layer((3, 3, 3, 8))},
            "pair": {"conv1": layer((3, 3, 8, 16)), "conv2": layer((3, 3, 16, 16))},
            "head": {"fc": layer((16, 10))}}
  targets = {"stem": {"conv": bn(8)}, "pair": {"conv1": bn(16), "conv2": bn(16)}, "head": {}}
  net = Network((stem, pair, head), params, targets)
  images = jax.random.normal(jax.random.PRNGKey(0), (48, 16, 16, 3), jnp.float32)
  chex.assert_shape(network_apply(net, images[:4]), (4, 10))
  program = nets.quantize_to_integers(net, images, weight_iters=20, act_iters=10)
  ops = [op["op"] for op in program.spec["ops"]]
  assert ops.count("requantize") == 3 and ops.count("conv") == 3
