"""Specification of rapq_jax.objective: RAPQ's BN-derived Lp exponent, the Lp
reconstruction loss, the BN-statistics term and the search's logit disagreement."""
import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rapq_jax import objective

HYPOTHESIS = settings(max_examples=30, deadline=None)
gammas = hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-50, 50, width=32))


def formula(gamma, coef, digits):
  g = np.asarray(gamma, np.float64)
  p = 1.0 + coef / (1.0 + np.exp(-(g.sum() - 1.0) / g.size))
  return p if digits is None else round(p, digits)


# ------------------------------------------------------------------ bn_lp_exponent

@given(gamma=gammas)
@HYPOTHESIS
def test_bn_lp_exponent_official_is_1_or_1_1(gamma):
  p = objective.bn_lp_exponent(gamma)
  assert type(p) is float
  assert p in (1.0, 1.1)
  assert p == formula(gamma, 0.1, 1)


@given(gamma=gammas)
@HYPOTHESIS
def test_bn_lp_exponent_official_is_1_1_whenever_the_gammas_sum_above_one(gamma):
  """What the docs say of the official rounding: p carries one bit of BN information,
  whether the gammas sum above 1 (1.1) or below (1.0), whatever their spread."""
  total = float(np.sum(np.asarray(gamma, np.float64)))
  if abs(total - 1.0) > 1e-6:          # at the boundary sigmoid(0) = 1/2 gives 1.05
    assert objective.bn_lp_exponent(gamma) == (1.1 if total > 1.0 else 1.0)


@given(gamma=gammas, coef=st.floats(0.01, 2.0), digits=st.integers(0, 4))
@HYPOTHESIS
def test_bn_lp_exponent_equals_formula(gamma, coef, digits):
  assert objective.bn_lp_exponent(gamma, coef=coef, digits=digits) == formula(gamma, coef, digits)


@given(gamma=gammas, coef=st.floats(0.01, 2.0))
@HYPOTHESIS
def test_bn_lp_exponent_unrounded(gamma, coef):
  p = objective.bn_lp_exponent(gamma, coef=coef, digits=None)
  np.testing.assert_allclose(p, formula(gamma, coef, None), rtol=1e-12)
  assert 1.0 <= p <= 1.0 + coef


def test_bn_lp_exponent_examples():
  # Mean-one gammas of 4 channels: sum - 1 = 3, sigmoid(3 / 4) = 0.679...
  p = objective.bn_lp_exponent(np.ones(4, np.float32), digits=None)
  np.testing.assert_allclose(p, 1.0 + 0.1 / (1.0 + np.exp(-0.75)), rtol=1e-12)
  assert objective.bn_lp_exponent(np.ones(4)) == 1.1
  assert objective.bn_lp_exponent(np.full(4, -1.0)) == 1.0
  assert objective.bn_lp_exponent(jnp.ones(8)) == 1.1            # jax arrays work too


@pytest.mark.parametrize("default", [2.0, 2.4, 3])
def test_bn_lp_exponent_without_bn_gets_default(default):
  p = objective.bn_lp_exponent(None, default=default)
  assert type(p) is float and p == float(default)


# ------------------------------------------------------------------ lp_loss

@given(pred=hnp.arrays(np.float32, (3, 2, 5), elements=st.floats(-10, 10, width=32)),
       target=hnp.arrays(np.float32, (3, 2, 5), elements=st.floats(-10, 10, width=32)),
       p=st.sampled_from([1.0, 1.1, 2.0, 2.4]))
@HYPOTHESIS
def test_lp_loss_reduction(pred, target, p):
  loss = objective.lp_loss(pred, target, p)
  chex.assert_shape(loss, ())
  chex.assert_type(loss, jnp.float32)
  ref = np.mean(np.sum(np.abs(pred.astype(np.float64) - target) ** p, axis=-1))
  np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-6)
  assert float(loss) >= 0.0


def test_lp_loss_sums_last_axis_and_averages_the_rest():
  pred = jnp.zeros((2, 4))
  target = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
  # Row sums of |.|**2: 4 and 4 -> mean 4 (a full mean would give 1).
  np.testing.assert_allclose(objective.lp_loss(pred, target, 2.0), 4.0)
  assert float(objective.lp_loss(target, target, 2.4)) == 0.0
  with pytest.raises(AssertionError):
    objective.lp_loss(pred, target[:, :3], 2.0)


# ------------------------------------------------------------------ bn_stats_loss

def stats_of(y):
  flat = y.reshape(-1, y.shape[-1])
  return {"mean": jnp.mean(flat, axis=0), "var": jnp.var(flat, axis=0)}


def test_bn_stats_loss_zero_when_stats_match():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  pre = {"conv1": jax.random.normal(key1, (4, 5, 5, 3)) * 2 + 1,
         "conv2": jax.random.normal(key2, (4, 5, 5, 6))}
  targets = {r: stats_of(y) for r, y in pre.items()}
  loss = objective.bn_stats_loss(pre, targets)
  chex.assert_shape(loss, ())
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)


def test_bn_stats_loss_value_and_skipped_layers():
  y = jnp.array([[0.0, 2.0], [2.0, 2.0]])            # mean (1, 2), var (1, 0)
  targets = {"a": {"mean": jnp.array([0.0, 2.0]), "var": jnp.array([1.0, 3.0])},
             "missing": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
  # channel terms: (1 + 0), (0 + 9) -> mean 5; the layer without output is skipped.
  np.testing.assert_allclose(objective.bn_stats_loss({"a": y, "fc": y}, targets), 5.0)
  assert float(objective.bn_stats_loss({"fc": y}, targets)) == 0.0
  assert float(objective.bn_stats_loss({}, {})) == 0.0


def test_bn_stats_loss_averages_layers():
  y = jnp.zeros((3, 2))
  targets = {"a": {"mean": jnp.ones(2), "var": jnp.zeros(2)},
             "b": {"mean": jnp.full(2, 3.0), "var": jnp.zeros(2)}}
  np.testing.assert_allclose(objective.bn_stats_loss({"a": y, "b": y}, targets), (1 + 9) / 2)


# ------------------------------------------------------------------ logits_disagreement

logit_arrays = hnp.arrays(np.float32, (4, 10), elements=st.floats(-30, 30, width=32))


@given(q=logit_arrays, fp=logit_arrays)
@HYPOTHESIS
def test_kl_nonnegative_and_matches_reference(q, fp):
  kl = objective.logits_disagreement(q, fp, "kl")
  chex.assert_shape(kl, ())
  chex.assert_type(kl, jnp.float32)
  assert float(kl) >= -1e-5                      # >= 0 up to float32 rounding
  lp = jax.nn.log_softmax(fp.astype(np.float64))
  lq = jax.nn.log_softmax(q.astype(np.float64))
  ref = np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))
  np.testing.assert_allclose(kl, ref, rtol=1e-3, atol=1e-4)


@given(fp=logit_arrays, shift=st.floats(-5, 5))
@HYPOTHESIS
def test_disagreement_zero_for_equal_logits(fp, shift):
  assert float(objective.logits_disagreement(fp, fp, "kl")) == 0.0
  assert float(objective.logits_disagreement(fp, fp, "mse")) == 0.0
  # KL only sees probabilities: a constant shift of the logits changes nothing.
  np.testing.assert_allclose(objective.logits_disagreement(fp + np.float32(shift), fp, "kl"), 0.0,
                             atol=1e-4)


@given(q=logit_arrays, fp=logit_arrays)
@HYPOTHESIS
def test_mse(q, fp):
  mse = objective.logits_disagreement(q, fp, "mse")
  np.testing.assert_allclose(mse, np.mean((q.astype(np.float64) - fp) ** 2), rtol=1e-5)


@given(q=logit_arrays, fp=logit_arrays, kind=st.sampled_from(objective.SEARCH_OBJECTIVES))
@HYPOTHESIS
def test_per_sample_disagreement_averages_to_the_objective(q, fp, kind):
  rows = objective.sample_disagreement(q, fp, kind)
  chex.assert_shape(rows, (q.shape[0],))
  np.testing.assert_allclose(np.mean(rows), objective.logits_disagreement(q, fp, kind),
                             rtol=1e-5, atol=1e-6)


@given(q=logit_arrays, fp=logit_arrays)
@HYPOTHESIS
def test_ce_is_the_cross_entropy_to_the_fp_top_class(q, fp):
  ce = objective.logits_disagreement(q, fp, "ce")
  lq = jax.nn.log_softmax(q.astype(np.float64))
  ref = -np.mean(lq[np.arange(q.shape[0]), np.argmax(fp, axis=-1)])
  np.testing.assert_allclose(ce, ref, rtol=1e-4, atol=1e-4)


def test_ce_only_sees_the_fp_top_class():
  """Two FP outputs with the same top class score q alike; q ranking that class first
  scores lower than q ranking it last."""
  q = jnp.array([[4.0, 1.0, 0.0]])
  for fp in ([[3.0, 2.0, 1.0]], [[9.0, -5.0, 0.0]]):
    np.testing.assert_allclose(objective.logits_disagreement(q, jnp.array(fp), "ce"),
                               -jax.nn.log_softmax(q)[0, 0])
  assert (objective.logits_disagreement(q, jnp.array([[1.0, 0.0, 0.0]]), "ce")
          < objective.logits_disagreement(q, jnp.array([[0.0, 0.0, 1.0]]), "ce"))


def test_kl_is_positive_for_different_predictions():
  fp = jnp.array([[5.0, 0.0, 0.0]])
  q = jnp.array([[0.0, 5.0, 0.0]])
  assert float(objective.logits_disagreement(q, fp, "kl")) > 1.0


@pytest.mark.parametrize("fn", [objective.logits_disagreement, objective.sample_disagreement])
@pytest.mark.parametrize("kind", ["KL", "l2", "", "mae"])
def test_unknown_kind(fn, kind):
  with pytest.raises(ValueError, match=f"unknown search objective {kind!r}"):
    fn(jnp.zeros((1, 3)), jnp.zeros((1, 3)), kind)
