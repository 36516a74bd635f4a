"""Specification of rapq_jax.power: ``|x|**p`` without XLA's scalar pow, with pow's
values and derivatives."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rapq_jax import power

HYPOTHESIS = settings(max_examples=30, deadline=None)

# Zero, or magnitudes whose powers and gradients stay normal float32 numbers.
# (One shape, so that every example runs the same compiled programs.)
values = hnp.arrays(np.float32, 64, elements=st.one_of(
    st.just(0.0), st.floats(2.0**-10, 2.0**10, width=32), st.floats(-2.0**10, -2.0**-10, width=32)))


@given(x=values, p=st.floats(0.5, 4.0))
@HYPOTHESIS
def test_abs_pow_is_pow_to_float32_precision(x, p):
  """A traced p takes the exp2/log2 form; its values and x-gradients are pow's to about
  1e-7 |p log2|x|| (relative; here at most 4e-6), finite everywhere, and 0 at x = 0."""
  expected = np.abs(x.astype(np.float64)) ** p
  got = power.abs_pow(jnp.asarray(x), jnp.float32(p))
  np.testing.assert_allclose(got, expected, rtol=4e-6, atol=1e-30)
  grad = jax.grad(lambda v: jnp.sum(power.abs_pow(v, jnp.float32(p))))(jnp.asarray(x))
  live = x != 0
  x64 = x[live].astype(np.float64)
  expected_grad = p * np.abs(x64) ** (p - 1) * np.sign(x64)
  np.testing.assert_allclose(np.asarray(grad)[live], expected_grad, rtol=4e-6)
  assert np.all(np.asarray(grad)[~live] == 0) and np.all(np.isfinite(grad))


def test_abs_pow_gradient_in_p_is_pow_ln():
  x = jnp.asarray([0.0, 0.5, -2.0, 3.0])
  grad = jax.grad(lambda p: jnp.sum(power.abs_pow(x, p)))(jnp.float32(1.1))
  expected = sum(abs(v) ** 1.1 * np.log(abs(v)) for v in (0.5, 2.0, 3.0))
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 1.0, 2.0])
def test_abs_pow_of_python_1_and_2_is_exact(p):
  x = jnp.asarray(np.random.default_rng(0).normal(size=100).astype(np.float32))
  np.testing.assert_array_equal(power.abs_pow(x, p), jnp.abs(x) if p == 1 else x * x)
