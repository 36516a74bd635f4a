"""Specification of rapq_jax.search: network-wide coordinate descent over integer
exponent offsets. A search never increases its objective, keeps every exponent an
integer, and is deterministic; ``shift_states`` adds the offsets exactly."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import random_variables

from rapq_jax import config, fold, objective, ptq, search
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.network import network_apply

HW = 16


@pytest.fixture(scope="module")
def problem():
  """A tiny folded CIFAR ResNet with naive (nearest-PoT, round-to-nearest) states."""
  model = CifarResNet(num_blocks=1)
  net = fold.build_network(random_variables(model, HW), model=model)
  calib = jax.random.normal(jax.random.PRNGKey(0), (64, HW, HW, 3), jnp.float32)
  # The naive settings and shapes of tests/test_ptq.py: a session running both files
  # compiles the initialisation once.
  cfg = config.for_method("naive", weight_iters=30, act_iters=10, exp_warm_iters=10, batch_size=8,
                          search_samples=32)
  specs = ptq.unit_specs(net, cfg)
  states = ptq._init_all(net, specs, calib, cfg)
  x = calib[:cfg.search_samples]
  fp_logits = jax.jit(network_apply)(net, x)
  result = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True)
  return net, states, specs, x, fp_logits, result


def objective_of(net, states, specs, x, fp_logits):
  logits = jax.jit(lambda n, s: search.quantized_logits(n, s, specs, x))(net, states)
  return float(objective.logits_disagreement(logits, fp_logits, "kl"))


def test_quantizer_names(problem):
  net, states, _, _, _, result = problem
  weights = [(u.name, "w", l.role) for u in net.units for l in u.layers]
  acts = [(u.name, "a", a.name) for u in net.units for a in u.acts]
  assert set(result.names) == set(weights) | set(acts)
  assert search.quantizer_names(net, states, weights=True, acts=False) == tuple(weights)
  assert search.quantizer_names(net, states, weights=False, acts=True) == tuple(acts)
  assert len(set(result.names)) == len(result.names)


def test_search_never_increases_objective(problem):
  net, states, specs, x, fp_logits, result = problem
  assert result.after <= result.before
  assert result.after < result.before             # naive states leave room to improve
  assert 1 <= result.sweeps <= 3
  # The reported values are the objective of the states before and after.
  np.testing.assert_allclose(result.before, objective_of(net, states, specs, x, fp_logits),
                             rtol=1e-4)
  np.testing.assert_allclose(result.after, objective_of(net, result.states, specs, x, fp_logits),
                             rtol=1e-4)


def test_search_returns_integral_exponents(problem):
  _, states, _, _, _, result = problem
  chex.assert_type(result.offsets, jnp.int32)
  chex.assert_shape(result.offsets, (len(result.names),))
  assert np.any(result.offsets != 0)
  for (unit, kind, name), offset in zip(result.names, np.asarray(result.offsets)):
    field = "log2s" if kind == "w" else "t"
    new = np.asarray(result.states[unit][kind][name][field])
    old = np.asarray(states[unit][kind][name][field])
    np.testing.assert_array_equal(new, np.round(new))
    np.testing.assert_array_equal(new, old + offset)


def test_search_is_deterministic(problem):
  net, states, specs, x, fp_logits, result = problem
  again = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True)
  np.testing.assert_array_equal(again.offsets, result.offsets)
  assert again.names == result.names
  assert (again.before, again.after, again.sweeps) == (result.before, result.after, result.sweeps)
  chex.assert_trees_all_equal(again.states, result.states)


def test_search_activations_only_leaves_weights(problem):
  net, states, specs, x, fp_logits, _ = problem
  acts = search.search_exponents(net, states, specs, x, fp_logits, weights=False, acts=True,
                                 kind="mse", max_sweeps=1)
  assert all(kind == "a" for _, kind, _ in acts.names)
  assert acts.sweeps == 1 and acts.after <= acts.before
  for unit in states:
    chex.assert_trees_all_equal(acts.states[unit]["w"], states[unit]["w"])


def test_shift_states_adds_offsets_exactly(problem):
  _, states, _, _, _, result = problem
  names = result.names
  offsets = jnp.asarray(np.random.default_rng(0).integers(-3, 4, len(names)), jnp.int32)
  before = jax.tree.map(np.array, states)
  shifted = search.shift_states(states, names, offsets)
  chex.assert_trees_all_equal(jax.tree.map(np.array, states), before)   # pure
  assert jax.tree.structure(shifted) == jax.tree.structure(states)
  for (unit, kind, name), offset in zip(names, np.asarray(offsets)):
    field = "log2s" if kind == "w" else "t"
    old = states[unit][kind][name]
    new = shifted[unit][kind][name]
    chex.assert_type(new[field], jnp.float32)
    np.testing.assert_array_equal(new[field], np.asarray(old[field]) + offset)
    for key in set(old) - {field}:
      np.testing.assert_array_equal(new[key], old[key])
  back = search.shift_states(shifted, names, -offsets)
  chex.assert_trees_all_equal(back, states)
  unchanged = search.shift_states(states, (), jnp.zeros((0,), jnp.int32))
  chex.assert_trees_all_equal(unchanged, states)


def test_below_bits_keeps_first_and_last_quantizers_out(problem):
  net, states, specs = problem[0], problem[1], problem[2]
  every = search.quantizer_names(net, states, weights=True, acts=True)
  low = search.quantizer_names(net, states, weights=True, acts=True, specs=specs, below_bits=8)
  bits = {n: specs[n[0]][0 if n[1] == "w" else 1][n[2]].bits for n in every}
  assert low == tuple(n for n in every if bits[n] < 8)
  assert 0 < len(low) < len(every)
