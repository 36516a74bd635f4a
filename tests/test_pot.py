"""Specification of rapq_jax.pot: exact power-of-two quantizers.

Every scale is exactly ``2**e`` with an int32 exponent ``e`` in [EXP_MIN, EXP_MAX];
integers stay in their ``bits``-bit range; ``fake_quant`` is the float view of
``quantize`` bit for bit, with a straight-through gradient inside the range.
"""
import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

from rapq_jax import pot

BITS = list(range(pot.MIN_BITS, pot.MAX_BITS + 1))
HYPOTHESIS = settings(max_examples=30, deadline=None)

STATIC = ("bits", "signed", "per_channel", "p")


def nearest_pot(x, bits: int, *, signed: bool, per_channel: bool, p: float = 2.4):
  """(e, zero_point) int32: the nearest power-of-two exponent of the Lp scale and its
  zero point (0 when signed), composed as ``fake_quant`` composes them."""
  lp = pot.lp_scale_search(x, bits, signed=signed, per_channel=per_channel, p=p)
  e = pot.log2_exponents(lp.scale)[0]
  return e, jnp.zeros_like(e) if signed else pot.zero_point_for(lp.lo, e, bits)


pot_init = jax.jit(nearest_pot, static_argnames=STATIC)


def is_power_of_two(a) -> np.ndarray:
  """Elementwise: ``a`` is exactly 2**k for an integer k (frexp mantissa exactly 1/2)."""
  mantissa, _ = np.frexp(np.asarray(a, np.float32))
  return mantissa == 0.5


# Values far off any grid, mixed in now and then: zeros, a subnormal, beyond float32's
# reach once divided by a small scale.
FAR = (0.0, -0.0, 1e-40, 3e38, -3e38)
# Fractions of a grid step, in 256ths: on the grid, ties (+-1/2, rounded half to even),
# just either side of a tie.
FRACTIONS = (0, 128, -128, 127, 129, -127, -129)


@st.composite
def quant_problems(draw, per_channel=None):
  """(x [6, 3] float32, e int32 [3] or (), bits, signed, zero point).

  x is drawn on and between the grid points of the quantizer under test: per element
  ``x / 2**e = j - zp + m / 256`` (exact in float32) with the integer level ``j`` from
  ``qmin - 3`` to ``qmax + 3`` (inside, on the ends of and just outside the clipping
  range) and the fraction ``m / 256`` one of ``FRACTIONS`` or any multiple of 1/256;
  about one element in ten is one of ``FAR`` instead. One shape keeps compilation out
  of the loop; hypothesis varies the values."""
  c = 3
  bits = draw(st.integers(pot.MIN_BITS, pot.MAX_BITS))
  signed = draw(st.booleans())
  if per_channel is None:
    per_channel = draw(st.booleans())
  shape = (c,) if per_channel else ()
  e = draw(hnp.arrays(np.int32, shape, elements=st.integers(-10, 10)))
  if signed:
    zp = np.zeros(shape, np.int32)
  else:
    zp = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, 2 ** bits - 1)))
  qmin, qmax = pot.int_range(bits, signed)
  level = st.integers(qmin - 3, qmax + 3)
  fraction = st.one_of(st.sampled_from(FRACTIONS), st.integers(-255, 255))
  cells = draw(st.lists(st.tuples(level, fraction, st.integers(0, 9), st.sampled_from(FAR)),
                        min_size=6 * c, max_size=6 * c))
  j, m, pick, far = (np.array(v).reshape(6, c) for v in zip(*cells))
  x = np.ldexp(((j - zp) * 256 + m).astype(np.float64), e - 8).astype(np.float32)
  x = np.where(pick == 0, far.astype(np.float32), x)
  return x, jnp.asarray(e), bits, signed, jnp.asarray(zp)


# ------------------------------------------------------------------ bits / ranges

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_int_range(bits, signed):
  qmin, qmax = pot.int_range(bits, signed)
  assert qmax - qmin == 2 ** bits - 1
  assert (qmin, qmax) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1))


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, True, False, "4", None])
def test_check_bits_rejects(bits):
  with pytest.raises(ValueError, match=r"2 to 8") as err:
    pot.check_bits(bits)
  assert repr(bits) in str(err.value)


@pytest.mark.parametrize("bits", [2, 4, 8, np.int32(3), np.int64(8)])
def test_check_bits_accepts_integers(bits):
  assert pot.check_bits(bits) == int(bits)
  assert type(pot.check_bits(bits)) is int


# ------------------------------------------------------------------ exponents

@given(e=hnp.arrays(np.int32, st.integers(1, 8), elements=st.integers(-40, 40)))
@HYPOTHESIS
def test_exp2_is_exact_power_of_two(e):
  scale = pot.exp2(e)
  chex.assert_type(scale, jnp.float32)
  chex.assert_shape(scale, e.shape)
  assert np.all(is_power_of_two(scale))
  np.testing.assert_array_equal(np.asarray(scale), np.ldexp(np.float32(1), e))


def test_clip_exponent_saturates():
  e = pot.clip_exponent(jnp.array([-1000, pot.EXP_MIN - 1, 0, pot.EXP_MAX + 1, 1000]))
  chex.assert_type(e, jnp.int32)
  np.testing.assert_array_equal(e, [pot.EXP_MIN, pot.EXP_MIN, 0, pot.EXP_MAX, pot.EXP_MAX])


@given(scale=hnp.arrays(np.float32, 8,
                        elements=st.floats(2.0 ** -100, 2.0 ** 100, width=32)))
@HYPOTHESIS
def test_log2_exponents_order(scale):
  nearest, floor, ceil = pot.log2_exponents(scale)
  for e in (nearest, floor, ceil):
    chex.assert_type(e, jnp.int32)
    chex.assert_shape(e, scale.shape)
  assert np.all(floor <= nearest) and np.all(nearest <= ceil)
  assert set(np.unique(np.asarray(ceil - floor))) <= {0, 1}
  # The exact binary floor / ceil of log2 (no float log2 involved), saturated.
  mantissa, exp = np.frexp(scale)
  sat = lambda e: np.clip(e, pot.EXP_MIN, pot.EXP_MAX)
  np.testing.assert_array_equal(floor, sat(exp - 1))
  np.testing.assert_array_equal(ceil, sat(np.where(mantissa == 0.5, exp - 1, exp)))
  # 2**floor <= scale <= 2**ceil where nothing saturated.
  inside = (exp - 1 > pot.EXP_MIN) & (exp < pot.EXP_MAX)
  assert np.all((pot.exp2(floor) <= scale)[inside]) and np.all((scale <= pot.exp2(ceil))[inside])


def test_log2_exponents_of_exact_powers_of_two():
  """floor == nearest == ceil == k for 2**k, for every k in the exponent range."""
  k = np.arange(pot.EXP_MIN, pot.EXP_MAX + 1, dtype=np.int32)
  for e in pot.log2_exponents(pot.exp2(k)):
    np.testing.assert_array_equal(e, k)


def test_log2_exponents_nearest_is_nearest_in_log_domain():
  scale = jnp.array([1.4, 1.42, 2.9, 3.0, 0.35, 0.36], jnp.float32)  # sqrt(2) ~ 1.414
  nearest, _, _ = pot.log2_exponents(scale)
  np.testing.assert_array_equal(nearest, [0, 1, 2, 2, -2, -1])


def test_log2_exponents_saturate_and_handle_non_positive():
  scale = jnp.array([0.0, -3.0, 2.0 ** -40, 2.0 ** 40, 1e-45], jnp.float32)
  for e in pot.log2_exponents(scale):
    np.testing.assert_array_equal(e, [pot.EXP_MIN, pot.EXP_MIN, pot.EXP_MIN, pot.EXP_MAX,
                                      pot.EXP_MIN])


# ------------------------------------------------------------------ quantize / dequantize

@given(problem=quant_problems())
@HYPOTHESIS
def test_quantize_integers_in_range(problem):
  x, e, bits, signed, zp = problem
  q = pot.quantize(x, e, bits, signed=signed, zero_point=zp)
  chex.assert_type(q, jnp.int32)
  chex.assert_shape(q, x.shape)
  qmin, qmax = pot.int_range(bits, signed)
  assert np.all(q >= qmin) and np.all(q <= qmax)


@given(problem=quant_problems())
@HYPOTHESIS
def test_quantize_matches_numpy_reference(problem):
  x, e, bits, signed, zp = problem
  qmin, qmax = pot.int_range(bits, signed)
  with np.errstate(over="ignore"):
    ref = np.clip(np.round(x.astype(np.float64) / np.ldexp(1.0, np.asarray(e))) + np.asarray(zp),
                  qmin, qmax)
  # XLA on CPU flushes float32 subnormals to zero; they all round to 0 anyway.
  np.testing.assert_array_equal(pot.quantize(x, e, bits, signed=signed, zero_point=zp), ref)


@given(problem=quant_problems())
@HYPOTHESIS
def test_dequantize_is_exact_multiple_of_power_of_two(problem):
  x, e, bits, signed, zp = problem
  q = pot.quantize(x, e, bits, signed=signed, zero_point=zp)
  y = pot.dequantize(q, e, zp)
  chex.assert_type(y, jnp.float32)
  chex.assert_shape(y, x.shape)
  ref = (np.asarray(q, np.int64) - np.asarray(zp)) * np.ldexp(1.0, np.asarray(e))
  np.testing.assert_array_equal(y, ref)


@given(problem=quant_problems())
@HYPOTHESIS
def test_fake_quant_equals_dequantize_of_quantize(problem):
  x, e, bits, signed, zp = problem
  fq = pot.fake_quant(x, e, bits, signed=signed, zero_point=zp)
  chex.assert_type(fq, jnp.float32)
  chex.assert_tree_all_finite(fq)
  chex.assert_trees_all_equal(
      fq, pot.dequantize(pot.quantize(x, e, bits, signed=signed, zero_point=zp), e, zp))


@given(problem=quant_problems())
@HYPOTHESIS
def test_fake_quant_is_idempotent(problem):
  x, e, bits, signed, zp = problem
  fq = pot.fake_quant(x, e, bits, signed=signed, zero_point=zp)
  chex.assert_trees_all_equal(pot.fake_quant(fq, e, bits, signed=signed, zero_point=zp), fq)
  chex.assert_trees_all_equal(pot.quantize(fq, e, bits, signed=signed, zero_point=zp),
                              pot.quantize(x, e, bits, signed=signed, zero_point=zp))


@given(problem=quant_problems())
@HYPOTHESIS
def test_fake_quant_gradient_is_straight_through_inside_range(problem):
  """d sum(fq(x)) / dx is 1 where the rounded integer lies in [qmin, qmax] (ends
  included, as torch.clamp's gradient) and 0 where it lies outside."""
  x, e, bits, signed, zp = problem
  qmin, qmax = pot.int_range(bits, signed)
  grad = jax.grad(lambda v: jnp.sum(pot.fake_quant(v, e, bits, signed=signed, zero_point=zp)))(x)
  chex.assert_shape(grad, x.shape)
  with np.errstate(over="ignore"):
    r = np.round(x.astype(np.float64) / np.ldexp(1.0, np.asarray(e))) + np.asarray(zp)
  np.testing.assert_array_equal(grad, ((r >= qmin) & (r <= qmax)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_fake_quant_gradient_at_range_ends(bits):
  """Values that round onto qmin or qmax are inside the range: gradient 1, not 1/2."""
  qmin, qmax = pot.int_range(bits, signed=False)
  x = jnp.array([qmin - 0.6, qmin + 0.2, qmin + 1.0, qmax - 0.3, qmax + 0.0, qmax + 0.4,
                 qmax + 0.6], jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(pot.fake_quant(v, jnp.int32(0), bits, signed=False)))(x)
  np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 1, 0])


def test_fake_quant_huge_values_saturate_without_nan():
  x = jnp.array([3e38, -3e38, 0.003], jnp.float32)
  fq = pot.fake_quant(x, jnp.int32(-10), 4, signed=True)
  np.testing.assert_array_equal(fq, np.array([7, -8, 3], np.float32) * 2.0 ** -10)
  grad = jax.grad(lambda v: jnp.sum(pot.fake_quant(v, jnp.int32(-10), 4, signed=True)))(x)
  np.testing.assert_array_equal(grad, [0, 0, 1])


def test_per_channel_exponents_index_last_axis():
  x = jnp.full((2, 3, 4), 1.3, jnp.float32)
  e = jnp.array([-3, -2, -1, 0], jnp.int32)
  q = pot.quantize(x, e, 8, signed=True)
  np.testing.assert_array_equal(q[0, 0], [10, 5, 3, 1])   # round(1.3 * 2**-e)
  with pytest.raises(AssertionError):
    pot.quantize(x, jnp.zeros((3,), jnp.int32), 8, signed=True)


def test_all_zero_channel_gets_exp_min_and_no_nan():
  x = jnp.stack([jnp.zeros(16), jnp.linspace(-1.0, 1.0, 16)], axis=-1)
  for signed in (True, False):
    e, zp = pot_init(x, bits=4, signed=signed, per_channel=True)
    assert int(e[0]) == pot.EXP_MIN and int(zp[0]) == 0
    assert pot.EXP_MIN < int(e[1]) < 0
    fq = pot.fake_quant(x, e, 4, signed=signed, zero_point=zp)
    chex.assert_tree_all_finite(fq)
    np.testing.assert_array_equal(fq[:, 0], 0.0)
  e, zp = pot_init(jnp.zeros((5, 3)), bits=4, signed=False, per_channel=False)
  assert int(e) == pot.EXP_MIN and int(zp) == 0


class JitConsistencyTest(chex.TestCase):
  """The pure functions give the same bits with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=[2, 5, 8], signed=[True, False])
  def test_fake_quant_equals_dequantize_of_quantize(self, bits, signed):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(scale=4.0, size=(7, 3)), jnp.float32)
    e = jnp.array([-4, -1, 2], jnp.int32)
    zp = jnp.zeros(3, jnp.int32) if signed else jnp.array([0, 1, 2 ** bits - 1], jnp.int32)
    fake = self.variant(lambda x, e, zp: pot.fake_quant(x, e, bits, signed=signed, zero_point=zp))
    real = self.variant(lambda x, e, zp: pot.dequantize(
        pot.quantize(x, e, bits, signed=signed, zero_point=zp), e, zp))
    chex.assert_trees_all_equal(fake(x, e, zp), real(x, e, zp))
    chex.assert_trees_all_equal(fake(x, e, zp), pot.fake_quant(x, e, bits, signed=signed,
                                                               zero_point=zp))

  @chex.variants(with_jit=True, without_jit=True)
  def test_log2_exponents(self):
    scale = jnp.array([0.0, 2.0 ** 13, 2.0 ** -15 * 1.5, 3.0e9], jnp.float32)
    got = self.variant(pot.log2_exponents)(scale)
    chex.assert_trees_all_equal(got, pot.log2_exponents(scale))
    np.testing.assert_array_equal(got[1], [pot.EXP_MIN, 13, -15, 31])


# ------------------------------------------------------------------ Lp search / init

def lp_error(x, scale, lo, bits, signed, p, axes):
  """mean |x - fq(x)|**p of a real-scale quantizer, float64 numpy."""
  x = x.astype(np.float64)
  qmin, qmax = pot.int_range(bits, signed)
  scale = np.asarray(scale, np.float64)
  safe = np.where(scale > 0, scale, 1.0)
  zp = np.zeros_like(safe) if signed else np.round(-np.asarray(lo, np.float64) / safe)
  q = np.clip(np.round(x / safe) + zp, qmin, qmax)
  return np.mean(np.abs((q - zp) * safe - x) ** p, axis=axes)


@given(x=hnp.arrays(np.float32, st.just((12, 3)),
                    elements=st.floats(-8, 8, width=32)),
       bits=st.integers(2, 8), signed=st.booleans(), per_channel=st.booleans())
@HYPOTHESIS
def test_lp_scale_search_no_worse_than_unclipped(x, bits, signed, per_channel):
  p = 2.4
  lp = pot.lp_scale_search(jnp.asarray(x), bits=bits, signed=signed, per_channel=per_channel, p=p)
  shape = (x.shape[-1],) if per_channel else ()
  for a in lp:
    chex.assert_shape(a, shape)
    chex.assert_type(a, jnp.float32)
  axes = 0 if per_channel else None
  lo0 = np.minimum(x.min(axis=axes), 0.0)
  hi0 = np.maximum(x.max(axis=axes), 0.0)
  if signed:
    hi0 = np.maximum(-lo0, hi0)
    lo0, scale0 = np.zeros_like(hi0), hi0 / 2 ** (bits - 1)
  else:
    scale0 = (hi0 - lo0) / (2 ** bits - 1)
  chosen = lp_error(x, lp.scale, lp.lo, bits, signed, p, axes)
  unclipped = lp_error(x, scale0, lo0, bits, signed, p, axes)
  assert np.all(chosen <= unclipped * (1 + 1e-4) + 1e-9)
  # The chosen range is a shrunk version of the full one.
  assert np.all(lp.lo <= 0) and np.all(lp.hi >= 0)
  assert np.all(lp.hi <= np.maximum(hi0, 0) * (1 + 1e-6) + 1e-12)


def test_lp_scale_search_clips_outliers():
  """One outlier among many uniform values: the best range is narrower than the full
  one and its error strictly lower."""
  x = np.concatenate([np.linspace(-1, 1, 1000), [3.0]]).astype(np.float32)
  lp = pot.lp_scale_search(jnp.asarray(x), 4, signed=True, per_channel=False, p=2.0)
  assert float(lp.hi) < 2.0
  err = lp_error(x, lp.scale, lp.lo, 4, True, 2.0, None)
  assert err < 0.75 * lp_error(x, 3.0 / 8, 0.0, 4, True, 2.0, None)


@given(x=hnp.arrays(np.float32, st.just((12, 3)),
                    elements=st.floats(-100, 100, width=32)),
       bits=st.integers(2, 8), signed=st.booleans(), per_channel=st.booleans())
@HYPOTHESIS
def test_nearest_pot_exponent_and_zero_point(x, bits, signed, per_channel):
  e, zp = pot_init(jnp.asarray(x), bits=bits, signed=signed, per_channel=per_channel)
  shape = (x.shape[-1],) if per_channel else ()
  chex.assert_shape([e, zp], shape)
  chex.assert_type([e, zp], jnp.int32)
  assert np.all(e >= pot.EXP_MIN) and np.all(e <= pot.EXP_MAX)
  assert np.all(is_power_of_two(pot.exp2(e)))
  _, qmax = pot.int_range(bits, signed=False)
  assert np.all(zp >= 0) and np.all(zp <= qmax)
  if signed:
    np.testing.assert_array_equal(zp, 0)
  # The result is usable: fake quantization is finite and integers in range.
  q = pot.quantize(jnp.asarray(x), e, bits, signed=signed, zero_point=zp)
  qmin, qmax = pot.int_range(bits, signed)
  assert np.all(q >= qmin) and np.all(q <= qmax)


@given(lo=hnp.arrays(np.float32, st.integers(1, 6), elements=st.floats(-1024, 0, width=32)),
       e=st.integers(-10, 10), bits=st.integers(2, 8))
@HYPOTHESIS
def test_zero_point_for(lo, e, bits):
  zp = pot.zero_point_for(jnp.asarray(lo), jnp.int32(e), bits)
  chex.assert_type(zp, jnp.int32)
  chex.assert_shape(zp, lo.shape)
  ref = np.clip(np.round(-lo.astype(np.float64) / 2.0 ** e), 0, 2 ** bits - 1)
  np.testing.assert_array_equal(zp, ref)
