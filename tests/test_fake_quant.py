"""Specification of rapq_jax.fake_quant: learnable weight and activation quantizer states.

Weights: Lp-initialised per-channel (last axis) step sizes that are exact powers of two
(nearest exponent), float (BRECQ), or a floor exponent plus a learnable fraction h(v)
(RAPQ) that ``harden_exponent`` turns into an exact integer; AdaRound logits ``alpha``
start at the unquantized weights. Activations: per-tensor ``2**round(t)``.
"""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

from rapq_jax import fake_quant, pot, rounding
from rapq_jax.fake_quant import ActSpec, WeightSpec

HYPOTHESIS = settings(max_examples=30, deadline=None)
SPECS = [WeightSpec(4, signed=False), WeightSpec(3, signed=True), WeightSpec(8, signed=True)]
# (kernel shape, spec): a conv kernel at 4 bits unsigned (integer zero point), a depthwise
# one at 3 bits signed, a dense one at 8 bits signed.
CASES = pytest.mark.parametrize("shape, spec", [
    ((3, 3, 4, 8), SPECS[0]), ((3, 3, 1, 6), SPECS[1]), ((16, 10), SPECS[2])])

# Jitted once per (shape, spec), as the library calls them (inside its jitted unit
# functions): eagerly, each of their operations would be dispatched on its own.
_init_weight = jax.jit(fake_quant.init_weight, static_argnums=1,
                       static_argnames=("learn_exponent", "learn_rounding", "p",
                                        "exponent_choice"))
_init_act = jax.jit(fake_quant.init_act, static_argnums=1,
                    static_argnames=("p", "exponent_choice"))


def init_weight(w, spec, **kw):
  return dict(_init_weight(w, spec, **kw))


def kernel(shape, seed=0):
  """Random kernel with per-output-channel magnitudes spread over a few octaves."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape) * np.exp2(rng.uniform(-6, 2, size=shape[-1]))
  return jnp.asarray(w, jnp.float32)


def lp_of(w, spec):
  return pot.lp_scale_search(w, spec.bits, signed=spec.signed, per_channel=True)


def grid_position(w, state, spec):
  """(x = w / scale, zp, inside): position on the integer grid, zero point and where
  the weight lies inside the quantizer's range ``[qmin, qmax - 1]`` (so that both
  rounding choices are representable)."""
  qmin, qmax = pot.int_range(spec.bits, spec.signed)
  scale = fake_quant.weight_scale(state, spec)
  zp = fake_quant.zero_point(state, spec, scale)
  x = w / scale
  inside = (jnp.floor(x) + zp >= qmin) & (jnp.floor(x) + zp + 1 <= qmax)
  return x, zp, inside


def assert_soft_reproduces(w, fq, state, spec):
  """Soft fake quant == w inside the range, relative to the step size: to float
  precision, except within 1e-4 of a grid point where init_logits keeps h off 0 and 1.
  A weight within float error of a grid point may take either neighbouring point:
  ``floor(w / s)`` flips when the soft scale differs by an ulp (e.g. jit vs eager)."""
  x, _, inside = grid_position(w, state, spec)
  inside = np.asarray(inside)
  assert np.mean(inside) > 0.5
  scale = np.broadcast_to(np.asarray(fake_quant.weight_scale(state, spec)), w.shape)[inside]
  err = np.abs(np.asarray(fq - w))[inside]
  x = np.asarray(x)[inside]
  frac = x - np.floor(x)
  on_grid = np.abs(x - np.round(x)) < 1e-5 * np.maximum(1.0, np.abs(x))
  inner = (frac > 1e-4) & (frac < 1 - 1e-4)
  tol = 1e-5 * np.maximum(np.abs(np.asarray(w))[inside], scale)   # float32 error
  assert np.all(err[inner] <= tol[inner])
  assert np.all(err[~on_grid] <= 1e-4 * scale[~on_grid] + tol[~on_grid])
  assert np.all(err[on_grid] <= 1.0001 * scale[on_grid] + tol[on_grid])
  assert np.mean(on_grid) < 0.05


# ------------------------------------------------------------------ init_weight

@CASES
def test_init_weight_pot_is_nearest_exponent(shape, spec):
  w = kernel(shape)
  state = init_weight(w, spec)
  assert set(state) == {"exp", "alpha", "lo"}
  chex.assert_shape([state["exp"], state["lo"]], (shape[-1],))
  chex.assert_shape(state["alpha"], shape)
  chex.assert_type([state["exp"], state["lo"], state["alpha"]], jnp.float32)
  lp = lp_of(w, spec)
  np.testing.assert_array_equal(state["exp"], pot.log2_exponents(lp.scale)[0])
  np.testing.assert_array_equal(state["lo"], lp.lo)
  scale = fake_quant.weight_scale(state, spec)
  np.testing.assert_array_equal(scale, pot.exp2(state["exp"].astype(jnp.int32)))
  assert np.all(np.frexp(np.asarray(scale))[0] == 0.5)


@CASES
def test_init_weight_grid_is_the_least_error_power_of_two_grid(shape, spec):
  """``exp_init='grid'``: per channel, the exponent among floor - 1, floor and ceil of the
  Lp scale's log2 and (unsigned) the zero point among all in range whose round-to-nearest
  Lp error is least (brute force below); never more error than the floor/ceil choice."""
  w, p = kernel(shape), 2.4
  qmin, qmax = pot.int_range(spec.bits, spec.signed)
  axes = tuple(range(w.ndim - 1))

  def error(state):
    q = fake_quant.weight_fake_quant(w, state, spec, soft=False)
    return np.mean(np.abs(np.asarray(q, np.float64) - np.asarray(w, np.float64)) ** p, axis=axes)

  grid = init_weight(w, spec, learn_rounding=False, exponent_choice="grid")
  lp = init_weight(w, spec, learn_rounding=False, exponent_choice="lp")
  _, e, zp = fake_quant.weight_integers(w, grid, spec)
  np.testing.assert_array_equal(grid["exp"], e)
  assert np.all((zp >= 0) & (zp <= max(qmax, 0)))
  floor_e = pot.log2_exponents(lp_of(w, spec).scale)[1]
  assert np.all((e >= floor_e - 1) & (e <= floor_e + 1))
  assert np.all(error(grid) <= error(lp) * (1 + 1e-5))
  brute = np.full(shape[-1], np.inf)
  for de in (-1, 0, 1):
    for z in range(qmax + 1 if not spec.signed else 1):
      s = np.exp2(np.asarray(floor_e, np.float64) + de)
      q = np.clip(np.round(np.asarray(w, np.float64) / s) + z, qmin, qmax)
      brute = np.minimum(brute, np.mean(np.abs((q - z) * s - np.asarray(w, np.float64)) ** p,
                                        axis=axes))
  np.testing.assert_allclose(error(grid), brute, rtol=1e-4)


@pytest.mark.parametrize("shape, spec", [((3, 3, 4, 8), WeightSpec(4, pot=False)),
                                         ((16, 10), WeightSpec(3, pot=False, signed=True))])
def test_init_weight_float_is_lp_scale(shape, spec):
  w = kernel(shape)
  state = init_weight(w, spec)
  assert "v" not in state
  lp = lp_of(w, spec)
  np.testing.assert_allclose(fake_quant.weight_scale(state, spec), lp.scale, rtol=1e-6)


@CASES
def test_init_weight_learn_exponent_starts_at_lp_scale(shape, spec):
  w = kernel(shape)
  state = init_weight(w, spec, learn_exponent=True)
  assert set(state) == {"exp", "v", "alpha", "lo"}
  chex.assert_shape([state["exp"], state["v"], state["lo"]], (shape[-1],))
  lp = lp_of(w, spec)
  log2s = np.log2(np.asarray(lp.scale, np.float64))
  e0 = np.asarray(state["exp"])
  np.testing.assert_array_equal(e0, np.round(e0))                  # integral floor
  # The floor of log2 (a float32 log2 may land on either side of an exact integer).
  near_int = np.abs(log2s - np.round(log2s)) < 1e-5
  np.testing.assert_array_equal(e0[~near_int], np.floor(log2s)[~near_int])
  assert np.all((e0 == np.round(log2s)) | (e0 == np.round(log2s) - 1))
  h = np.asarray(rounding.rectified_sigmoid(state["v"]))
  frac = log2s - e0
  inner = (frac > 1e-4) & (frac < 1 - 1e-4)
  np.testing.assert_allclose(h[inner], frac[inner], atol=1e-5)      # h(v) = fractional part
  scale = np.asarray(fake_quant.weight_scale(state, spec))
  np.testing.assert_allclose(scale[inner], lp.scale[inner], rtol=1e-5)
  np.testing.assert_allclose(scale, lp.scale, rtol=1e-4)           # soft scale = Lp scale


def test_init_weight_without_rounding_has_no_alpha():
  state = init_weight(kernel((3, 3, 4, 8)), SPECS[0], learn_rounding=False)
  assert set(state) == {"exp", "lo"}


def test_init_weight_all_zero_channel():
  w = kernel((3, 3, 4, 8)).at[..., 1].set(0.0)
  for learn_exponent in (False, True):
    state = init_weight(w, SPECS[0], learn_exponent=learn_exponent)
    chex.assert_tree_all_finite(state)
    np.testing.assert_array_equal(state["exp"][1], pot.EXP_MIN)
    fq = fake_quant.weight_fake_quant(w, state, SPECS[0], soft=False)
    chex.assert_tree_all_finite(fq)
    np.testing.assert_array_equal(fq[..., 1], 0.0)
    soft = fake_quant.weight_fake_quant(w, state, SPECS[0], soft=True)
    assert np.all(np.abs(soft[..., 1]) <= 1.1e-4 * 2.0 ** pot.EXP_MIN)


# ------------------------------------------------------------------ weight_fake_quant

@CASES
@pytest.mark.parametrize("mode", ["pot", "learn_exponent", "float"])
def test_soft_fake_quant_starts_at_weights(shape, spec, mode):
  """With freshly initialised alpha, soft rounding reproduces w inside the clip range."""
  if mode == "float":
    spec = dataclasses.replace(spec, pot=False)
  w = kernel(shape, seed=1)
  state = init_weight(w, spec, learn_exponent=mode == "learn_exponent")
  fq = fake_quant.weight_fake_quant(w, state, spec, soft=True)
  chex.assert_shape(fq, shape)
  chex.assert_type(fq, jnp.float32)
  assert_soft_reproduces(w, fq, state, spec)


@CASES
def test_hard_fake_quant_without_alpha_is_round_to_nearest(shape, spec):
  w = kernel(shape, seed=2)
  state = init_weight(w, spec, learn_rounding=False)
  e = state["exp"].astype(jnp.int32)
  zp = pot.zero_point_for(state["lo"], e, spec.bits) if not spec.signed else 0
  for soft in (True, False):
    fq = fake_quant.weight_fake_quant(w, state, spec, soft=soft)
    chex.assert_trees_all_equal(fq, pot.fake_quant(w, e, spec.bits, signed=spec.signed,
                                                   zero_point=zp))


@CASES
def test_hard_fake_quant_with_fresh_alpha_is_round_to_nearest(shape, spec):
  """alpha >= 0 exactly where the fractional part is >= 1/2."""
  w = kernel(shape, seed=3)
  state = init_weight(w, spec)
  e = state["exp"].astype(jnp.int32)
  zp = pot.zero_point_for(state["lo"], e, spec.bits) if not spec.signed else 0
  fq = fake_quant.weight_fake_quant(w, state, spec, soft=False)
  rtn = pot.fake_quant(w, e, spec.bits, signed=spec.signed, zero_point=zp)
  x = np.asarray(w / pot.exp2(e))
  tie = np.abs(x - np.floor(x) - 0.5) < 1e-3    # half-to-even vs half-up: both fine
  np.testing.assert_array_equal(np.asarray(fq)[~tie], np.asarray(rtn)[~tie])


# ------------------------------------------------------------------ harden / integers

@CASES
def test_harden_exponent(shape, spec):
  w = kernel(shape, seed=4)
  state = init_weight(w, spec, learn_exponent=True)
  # Move some logits across 0 to exercise both choices.
  state["v"] = state["v"] + jnp.asarray(np.random.default_rng(0).normal(size=shape[-1]) * 3,
                                        jnp.float32)
  hard = fake_quant.harden_exponent(w, state, spec)
  assert set(hard) == {"exp", "alpha", "lo"}
  expected = np.asarray(state["exp"]) + (np.asarray(state["v"]) >= 0)
  np.testing.assert_array_equal(hard["exp"], expected)
  np.testing.assert_array_equal(hard["exp"], np.round(hard["exp"]))
  chex.assert_type(hard["exp"], jnp.float32)
  np.testing.assert_array_equal(hard["lo"], state["lo"])
  scale = fake_quant.weight_scale(hard, spec)
  np.testing.assert_array_equal(scale, np.ldexp(np.float32(1), expected.astype(np.int32)))
  # alpha restarts on the new integer grid: soft rounding reproduces w again.
  assert_soft_reproduces(w, fake_quant.weight_fake_quant(w, hard, spec, soft=True), hard, spec)
  kept = fake_quant.harden_exponent(w, state, spec, reinit_alpha=False)
  np.testing.assert_array_equal(kept["alpha"], state["alpha"])
  np.testing.assert_array_equal(kept["exp"], hard["exp"])


@CASES
def test_move_exponents_restarts_only_the_moved_channels(shape, spec):
  """Exponents move by the given integers (saturated to the exponent range); a moved
  channel's rounding restarts on its new grid (soft rounding reproduces w there), an
  unmoved channel keeps its learned logits."""
  w = kernel(shape, seed=6)
  state = init_weight(w, spec)
  state["alpha"] = state["alpha"] + jnp.asarray(
      np.random.default_rng(2).normal(size=shape), jnp.float32)
  moves = jnp.asarray(np.arange(shape[-1]) % 3 - 1, jnp.int32)        # -1, 0, +1, ...
  moved = fake_quant.move_exponents(w, state, spec, moves)
  np.testing.assert_array_equal(moved["exp"], np.asarray(state["exp"]) + np.asarray(moves))
  chex.assert_type(moved["exp"], jnp.float32)
  np.testing.assert_array_equal(moved["lo"], state["lo"])
  same = np.asarray(moves) == 0
  np.testing.assert_array_equal(np.asarray(moved["alpha"])[..., same],
                                np.asarray(state["alpha"])[..., same])
  fresh = fake_quant.reset_rounding(w, {**state, "exp": moved["exp"]}, spec)
  np.testing.assert_array_equal(np.asarray(moved["alpha"])[..., ~same],
                                np.asarray(fresh["alpha"])[..., ~same])
  low = fake_quant.move_exponents(w, state, spec, jnp.full(shape[-1], -100, jnp.int32))
  np.testing.assert_array_equal(low["exp"], np.full(shape[-1], pot.EXP_MIN, np.float32))
  with pytest.raises(AssertionError):
    fake_quant.move_exponents(w, state, spec, moves[:-1])


@CASES
@pytest.mark.parametrize("learn", ["none", "rounding", "exponent"])
def test_weight_integers(shape, spec, learn):
  w = kernel(shape, seed=5)
  state = init_weight(w, spec, learn_exponent=learn == "exponent",
                                 learn_rounding=learn != "none")
  if learn == "exponent":
    with pytest.raises(ValueError, match="harden"):
      fake_quant.weight_integers(w, state, spec)
    state = fake_quant.harden_exponent(w, state, spec)
  if "alpha" in state:   # a learned rounding, not round to nearest
    state["alpha"] = state["alpha"] + jnp.asarray(
        np.random.default_rng(1).normal(size=shape), jnp.float32)
  q, e, zp = fake_quant.weight_integers(w, state, spec)
  chex.assert_shape(q, shape)
  chex.assert_shape([e, zp], (shape[-1],))
  chex.assert_type(q, jnp.int8 if spec.signed else jnp.uint8)
  chex.assert_type([e, zp], jnp.int32)
  qmin, qmax = pot.int_range(spec.bits, spec.signed)
  assert np.all(np.asarray(q, np.int32) >= qmin) and np.all(np.asarray(q, np.int32) <= qmax)
  assert np.all(zp >= 0) and np.all(zp <= (0 if spec.signed else qmax))
  np.testing.assert_array_equal(e, state["exp"])
  deq = pot.dequantize(q.astype(jnp.int32), e, zp)
  chex.assert_trees_all_equal(deq, fake_quant.weight_fake_quant(w, state, spec, soft=False))


def test_weight_integers_needs_pot():
  w = kernel((3, 3, 4, 8))
  spec = WeightSpec(4, pot=False)
  with pytest.raises(ValueError, match="power-of-two"):
    fake_quant.weight_integers(w, init_weight(w, spec), spec)


class WeightJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_fake_quant_matches_integers(self, signed):
    spec = WeightSpec(4, signed=signed)
    w = kernel((3, 3, 4, 8), seed=6)
    state = fake_quant.harden_exponent(w, init_weight(w, spec, learn_exponent=True),
                                       spec)
    fq = self.variant(lambda w, s: fake_quant.weight_fake_quant(w, s, spec, soft=False))(w, state)
    q, e, zp = self.variant(lambda w, s: fake_quant.weight_integers(w, s, spec))(w, state)
    chex.assert_trees_all_equal(fq, pot.dequantize(q.astype(jnp.int32), e, zp))


# ------------------------------------------------------------------ activations

@given(t=st.floats(-20.0, 20.0, width=32))
@HYPOTHESIS
def test_act_scale_pot_forward_and_gradient(t):
  spec = ActSpec(4)
  state = {"exp": jnp.float32(t)}
  scale = fake_quant.act_scale(state, spec)
  chex.assert_shape(scale, ())
  chex.assert_type(scale, jnp.float32)
  expected = pot.exp2(jnp.round(jnp.float32(t)).astype(jnp.int32))
  assert float(scale) == float(expected)                         # exactly 2**round(t)
  assert np.frexp(np.float32(scale))[0] == 0.5
  grad = jax.grad(lambda t: fake_quant.act_scale({"exp": t}, spec))(jnp.float32(t))
  np.testing.assert_allclose(grad, float(expected) * math.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("t", [-3.7, 0.0, 2.25])
def test_act_scale_float(t):
  spec = ActSpec(4, pot=False)
  np.testing.assert_allclose(fake_quant.act_scale({"exp": jnp.float32(t)}, spec), 2.0 ** t,
                             rtol=1e-6)
  grad = jax.grad(lambda t: fake_quant.act_scale({"exp": t}, spec))(jnp.float32(t))
  np.testing.assert_allclose(grad, 2.0 ** t * math.log(2.0), rtol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    fake_quant.act_exponent({"exp": jnp.float32(t)}, spec)


@pytest.mark.parametrize("spec", [ActSpec(4), ActSpec(4, signed=True), ActSpec(8), ActSpec(2)])
def test_act_quantizer_is_pot_fake_quant(spec):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)) * 3.0, jnp.float32)
  if not spec.signed:
    x = jax.nn.relu(x)
  state = _init_act(x, spec)
  assert set(state) == {"exp"}
  chex.assert_shape(state["exp"], ())
  assert float(state["exp"]) == round(float(state["exp"]))
  lp = pot.lp_scale_search(x, spec.bits, signed=spec.signed, per_channel=False)
  assert float(state["exp"]) == float(pot.log2_exponents(lp.scale)[0])
  e = fake_quant.act_exponent(state, spec)
  chex.assert_type(e, jnp.int32)
  chex.assert_trees_all_equal(fake_quant.act_fake_quant(x, state, spec),
                              pot.fake_quant(x, e, spec.bits, signed=spec.signed))
  # Off-integer t: still quantized on 2**round(t).
  off = {"exp": state["exp"] + 0.3}
  chex.assert_trees_all_equal(fake_quant.act_fake_quant(x, off, spec),
                              pot.fake_quant(x, e, spec.bits, signed=spec.signed))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spec", [ActSpec(4), ActSpec(2), ActSpec(4, signed=True)])
def test_act_exponent_lp_choice_takes_the_side_with_less_error(spec, seed):
  """``exponent_choice='lp'``: of the floor and ceil of the Lp scale, the exponent whose
  round-to-nearest Lp error on ``x`` is smaller; ``'nearest'`` is one of the two."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_t(3, size=(4, 6, 6, 3)) * rng.uniform(0.1, 10), jnp.float32)
  if not spec.signed:
    x = jax.nn.relu(x)
  lp = pot.lp_scale_search(x, spec.bits, signed=spec.signed, per_channel=False)
  _, lo_e, hi_e = (int(e) for e in pot.log2_exponents(lp.scale))
  err = {e: float(jnp.mean(jnp.abs(pot.fake_quant(x, e, spec.bits, signed=spec.signed) - x)
                           ** 2.4)) for e in (lo_e, hi_e)}
  chosen = int(_init_act(x, spec, p=2.4, exponent_choice="lp")["exp"])
  assert chosen == (hi_e if err[hi_e] < err[lo_e] else lo_e)
  assert int(_init_act(x, spec)["exp"]) in (lo_e, hi_e)
  with pytest.raises(ValueError, match="exponent_choice = 'grid'"):
    fake_quant.init_act(x, spec, exponent_choice="grid")


def test_states_saved_by_an_older_version_read_under_the_names_now():
  old = {"w": {"conv1": {"log2s": jnp.zeros(4), "lo": jnp.ones(4), "alpha": jnp.ones((1, 4))}},
         "a": {"out": {"t": jnp.float32(-3.0)}}}
  new = fake_quant.current_state_names(old)
  assert set(new["w"]["conv1"]) == {"exp", "lo", "alpha"} and set(new["a"]["out"]) == {"exp"}
  chex.assert_trees_all_equal(new["a"]["out"]["exp"], old["a"]["out"]["t"])
  assert fake_quant.current_state_names(new) == new
