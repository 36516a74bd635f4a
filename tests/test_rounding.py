"""Specification of rapq_jax.rounding: the rectified sigmoid relaxation of a binary
rounding choice, its inverse, the AdaRound regulariser and its temperature schedule."""
import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from rapq_jax import rounding

HYPOTHESIS = settings(max_examples=30, deadline=None)

# The points where the relaxation changes behaviour: the hard choice flips at v = 0
# (h = 1/2) and h saturates at 0 for v <= -EDGE and at 1 for v >= EDGE
# (sigmoid(v) * (ZETA - GAMMA) + GAMMA = 0 or 1 there).
EDGE = float(np.log((rounding.ZETA - rounding.GAMMA) / -rounding.GAMMA - 1.0))   # log(11)
f32 = lambda v: float(np.float32(v))
TINY = float(np.finfo(np.float32).tiny)


def normal(v: float) -> bool:
  """Zero or a normal float32: XLA on CPU flushes subnormals to zero (a subnormal
  negative logit would compare as >= 0), so the strategies leave them out."""
  return v == 0.0 or abs(v) >= TINY


def near(points, spread):
  """float32 values within ``spread`` of one of ``points`` (both sides, the points
  themselves and their float32 neighbours included)."""
  exact = [f32(np.nextafter(np.float32(p), np.float32(d)))
           for p in points for d in (-np.inf, np.inf)] + [f32(p) for p in points]
  offset = st.builds(lambda p, d: f32(p + d), st.sampled_from(points),
                     st.floats(-f32(spread), f32(spread), width=32, allow_subnormal=False))
  return st.one_of(st.sampled_from([v for v in exact if normal(v)]), offset.filter(normal))


# Logits: at and around the flip and the saturation edges, anywhere in between and
# beyond, and (rarely) huge.
logits = hnp.arrays(np.float32, 16, elements=st.one_of(
    near((0.0, EDGE, -EDGE), 1e-3), st.floats(-8.0, 8.0, width=32, allow_subnormal=False),
    st.sampled_from([-0.0, -1e6, 1e6, f32(1e-30), f32(-1e-30)])))
# Fractions in [0, 1]: at and around 0, 1/2, 1 and init_logits' clipping points 1e-4 and
# 1 - 1e-4, and multiples of 1/64 in between.
fractions = hnp.arrays(np.float32, 16, elements=st.one_of(
    near((0.0, 0.5, 1.0, 1e-4, 1.0 - 1e-4), 1e-4).filter(lambda f: 0.0 <= f <= 1.0),
    st.integers(0, 64).map(lambda k: k / 64),
    st.floats(0.0, 1.0, width=32, allow_subnormal=False)))


@given(v=logits)
@HYPOTHESIS
def test_rectified_sigmoid_in_unit_interval(v):
  h = rounding.rectified_sigmoid(v)
  chex.assert_shape(h, v.shape)
  chex.assert_type(h, jnp.float32)
  assert np.all(h >= 0.0) and np.all(h <= 1.0)


def test_rectified_sigmoid_saturates_and_is_monotone():
  v = jnp.linspace(-10.0, 10.0, 201)
  h = np.asarray(rounding.rectified_sigmoid(v))
  assert np.all(np.diff(h) >= 0)
  assert h[0] == 0.0 and h[-1] == 1.0          # stretched past [0, 1], then clipped
  np.testing.assert_allclose(rounding.rectified_sigmoid(jnp.float32(0.0)), 0.5, atol=1e-7)


@given(v=logits)
@HYPOTHESIS
def test_hard_choice_is_h_at_least_half(v):
  hard = rounding.hard_choice(v)
  chex.assert_type(hard, jnp.float32)
  np.testing.assert_array_equal(hard, (v >= 0).astype(np.float32))
  h = rounding.rectified_sigmoid(v)
  assert np.all((h >= 0.5) | (hard == 0)) and np.all((h <= 0.5) | (hard == 1))


@given(f=fractions)
@HYPOTHESIS
def test_init_logits_inverts_rectified_sigmoid(f):
  v = rounding.init_logits(f)
  chex.assert_shape(v, f.shape)
  chex.assert_tree_all_finite(v)
  h = rounding.rectified_sigmoid(v)
  # Fractions are kept 1e-4 away from 0 and 1 (so the logit stays inside the
  # unsaturated part of h); elsewhere h(init_logits(f)) == f to float precision.
  inner = (f >= 1e-4) & (f <= 1 - 1e-4)
  np.testing.assert_allclose(h[inner], f[inner], atol=2e-6)
  np.testing.assert_allclose(h, f, atol=1e-4 + 2e-6)
  assert np.all((h > 0) & (h < 1))


def test_init_logits_hard_choice_is_round_to_nearest():
  f = jnp.array([0.1, 0.49, 0.51, 0.9], jnp.float32)
  np.testing.assert_array_equal(rounding.hard_choice(rounding.init_logits(f)), [0, 0, 1, 1])


@pytest.mark.parametrize("b", [2.0, 8.0, 20.0])
def test_regularizer_zero_exactly_at_binary_choices(b):
  v = jnp.array([-50.0, -5.0, -3.0, 3.0, 5.0, 50.0], jnp.float32)   # all h in {0, 1}
  assert set(np.asarray(rounding.rectified_sigmoid(v)).tolist()) == {0.0, 1.0}
  reg = rounding.regularizer(v, b)
  chex.assert_shape(reg, ())
  assert float(reg) == 0.0


@given(f=hnp.arrays(np.float32, 8, elements=st.floats(2.0 ** -6, 1 - 2.0 ** -6, width=32)),
       b=st.floats(2.0, 20.0))
@HYPOTHESIS
def test_regularizer_positive_between_binary_choices(f, b):
  v = rounding.init_logits(f)
  per_element = jax.vmap(lambda vi: rounding.regularizer(vi, b))(v)
  assert np.all(per_element > 0)
  np.testing.assert_allclose(rounding.regularizer(v, b), np.sum(per_element), rtol=1e-5)
  # The closed form: sum(1 - |2h - 1| ** b).
  h = np.asarray(rounding.rectified_sigmoid(v), np.float64)
  np.testing.assert_allclose(rounding.regularizer(v, b), np.sum(1 - np.abs(2 * h - 1) ** b),
                             rtol=1e-4)


def test_regularizer_is_largest_at_half():
  v = rounding.init_logits(jnp.array([0.5, 0.3, 0.1], jnp.float32))
  per_element = jax.vmap(lambda vi: rounding.regularizer(vi, 2.0))(v)
  np.testing.assert_allclose(per_element[0], 1.0, atol=1e-5)
  assert per_element[0] > per_element[1] > per_element[2]


@pytest.mark.parametrize("num_steps, warmup", [(100, 0.2), (1000, 0.2), (50, 0.0), (10, 0.5),
                                              (15, 0.2), (7, 0.3)])
def test_temperature_is_constant_then_linear_to_end_b(num_steps, warmup):
  start_b, end_b = 20.0, 2.0
  warm = rounding.warmup_steps(num_steps, warmup)
  assert warm == int(warmup * num_steps)
  # One compiled function for every budget: the counts are traced arguments.
  b_at = jax.jit(lambda i, n, w: rounding.temperature(i, n, w, start_b=start_b, end_b=end_b))
  b = np.array([b_at(i, np.int32(num_steps), np.int32(warm)) for i in range(num_steps + 2)])
  np.testing.assert_array_equal(b[:warm + 1], start_b)     # constant through the warm-up
  assert np.all(np.diff(b[warm:num_steps + 1]) < 0)        # then strictly decreasing
  np.testing.assert_array_equal(b[num_steps:], end_b)      # ... to exactly end_b
  slope = (end_b - start_b) / (num_steps - warm)           # ... linearly
  np.testing.assert_allclose(b[warm:num_steps + 1],
                             start_b + slope * np.arange(num_steps - warm + 1), rtol=1e-6)


LINEAR = jax.jit(rounding.linear)


@given(steps=st.integers(1, 5000), count=st.integers(-5, 6000),
       start=st.floats(-100, 100, width=32), end=st.floats(-100, 100, width=32))
@settings(max_examples=50, deadline=None)
def test_linear_is_optax_linear_schedule_to_float32_rounding(steps, count, start, end):
  """The traced-count schedule has the values of optax's (whose count is a python int)."""
  got = float(LINEAR(np.int32(count), np.int32(steps), np.float32(start), np.float32(end)))
  expected = float(optax.linear_schedule(start, end, steps)(count))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * (abs(start) + abs(end)))


def test_regularizer_active_after_warmup():
  active = np.array([float(rounding.regularizer_active(jnp.int32(i), jnp.int32(20)))
                     for i in range(100)])
  np.testing.assert_array_equal(active, (np.arange(100) >= 20).astype(np.float32))


def test_regularizer_alone_drives_h_to_binary():
  """A few hundred Adam steps on the regulariser with b = 2 push every h to 0 or 1,
  each to the side it started on."""
  v0 = jax.random.normal(jax.random.PRNGKey(0), (256,)) * 2.0
  opt = optax.adam(0.1)

  @jax.jit
  def step(v, state):
    grads = jax.grad(rounding.regularizer)(v, 2.0)
    updates, state = opt.update(grads, state, v)
    return optax.apply_updates(v, updates), state

  v, state = v0, opt.init(v0)
  for _ in range(300):
    v, state = step(v, state)
  h = np.asarray(rounding.rectified_sigmoid(v))
  assert float(rounding.regularizer(v0, 2.0)) > 10.0
  assert set(np.unique(h).tolist()) <= {0.0, 1.0}
  assert float(rounding.regularizer(v, 2.0)) == 0.0
  np.testing.assert_array_equal(rounding.hard_choice(v), rounding.hard_choice(v0))
