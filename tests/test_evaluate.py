"""Specification of rapq_jax.evaluate: top-1/top-5 accuracy, data-parallel over devices."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rapq_jax.evaluate import evaluate, predict, scores

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_problem(n, num_classes=10, seed=0):
  """Random uint8 images [n,4,4,3], labels, and weights of a linear classifier."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, size=n)
  weights = rng.normal(size=(4 * 4 * 3, num_classes)).astype(np.float32)
  return images, labels, weights


def linear_apply(weights):
  return lambda x: x.reshape(x.shape[0], -1) @ weights


def to_float(images):
  return images.astype(np.float32) / 255.0


def numpy_accuracy(images, labels, weights):
  """(top1 %, top5 %) computed in float64 numpy."""
  logits = to_float(images).reshape(len(images), -1).astype(np.float64) @ weights
  ranked = np.argsort(-logits, axis=1)
  top5 = np.any(ranked[:, :5] == labels[:, None], axis=1)
  return 100 * np.mean(ranked[:, 0] == labels), 100 * np.mean(top5)


@pytest.mark.parametrize("n,batch_size", [(1, 256), (37, 10), (64, 64), (100, 7)])
def test_matches_numpy_reference(n, batch_size):
  images, labels, weights = linear_problem(n)
  result = evaluate(linear_apply(weights), images, labels, batch_size=batch_size,
                    preprocess=to_float, progress=False)
  top1, top5 = numpy_accuracy(images, labels, weights)
  assert result["n"] == n
  chex.assert_trees_all_close((result["top1"], result["top5"]), (top1, top5))


@pytest.mark.parametrize("n,batch_size", [(1, 256), (37, 10), (100, 7)])
def test_agreement_and_kl_against_a_reference_match_numpy(n, batch_size):
  """A perturbed classifier against the original: the share of images with the same
  top-1 class and the mean KL(reference || model), padded rows of the last batch not
  counted."""
  images, labels, weights = linear_problem(n)
  noisy = weights + np.random.default_rng(1).normal(size=weights.shape).astype(np.float32) * 0.5
  result = evaluate(linear_apply(noisy), images, labels, batch_size=batch_size,
                    preprocess=to_float, progress=False, reference_logits=_logits(images, weights))
  x = to_float(images).reshape(n, -1).astype(np.float64)
  ref, q = x @ weights, x @ noisy
  log_softmax = lambda z: z - z.max(1, keepdims=True) - np.log(
      np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
  lr, lq = log_softmax(ref), log_softmax(q)
  kl = np.mean(np.sum(np.exp(lr) * (lr - lq), axis=1))
  agree = 100 * np.mean(ref.argmax(1) == q.argmax(1))
  chex.assert_trees_all_close((result["agreement"], result["kl_to_reference"]), (agree, kl),
                              rtol=1e-4, atol=1e-6)
  assert 0 < result["kl_to_reference"] and (n == 1 or result["agreement"] < 100)
  same = evaluate(linear_apply(weights), images, labels, batch_size=batch_size,
                  preprocess=to_float, progress=False, reference_logits=_logits(images, weights))
  assert same["agreement"] == 100.0 and abs(same["kl_to_reference"]) < 1e-6
  plain = evaluate(linear_apply(noisy), images, labels, batch_size=batch_size,
                   preprocess=to_float, progress=False)
  assert "agreement" not in plain and plain["top1"] == result["top1"]


def _logits(images, weights):
  return predict(linear_apply(weights), images, preprocess=to_float, progress=False)


@pytest.mark.parametrize("rows,classes", [(8, 5), (7, 10)])
def test_a_reference_of_another_shape_is_refused_before_predicting(rows, classes):
  images, labels, weights = linear_problem(8)
  calls = []

  def apply_fn(x):
    calls.append(x.shape)
    return linear_apply(weights)(x)

  with pytest.raises(ValueError, match=r"reference_logits must be shaped like the logits "
                                       rf"\(8, 10\); got \({rows}, {classes}\)"):
    evaluate(apply_fn, images, labels, preprocess=to_float, progress=False,
             reference_logits=np.zeros((rows, classes), np.float32))
  assert len(calls) == 1   # traced once for the logits' shape, never predicted


@pytest.mark.parametrize("n,batch_size", [(1, 256), (37, 10), (100, 7)])
def test_predict_returns_every_row_and_scores_give_evaluate(n, batch_size):
  """predict's logits are the classifier's, one row per image (padded rows dropped);
  scores of them are evaluate's figures."""
  images, labels, weights = linear_problem(n)
  logits = predict(linear_apply(weights), images, batch_size=batch_size, preprocess=to_float,
                   progress=False)
  chex.assert_shape(logits, (n, 10))
  np.testing.assert_allclose(logits, to_float(images).reshape(n, -1) @ weights, rtol=1e-5,
                             atol=1e-5)
  assert scores(logits, labels) == evaluate(linear_apply(weights), images, labels,
                                            batch_size=batch_size, preprocess=to_float,
                                            progress=False)


def test_scores_break_ties_toward_the_lower_class():
  logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], np.float32)
  assert scores(logits, np.array([0, 1]))["top1"] == 100.0
  assert scores(logits, np.array([1, 2]))["top1"] == 0.0


def test_float_images_need_no_preprocess():
  images, labels, weights = linear_problem(20)
  with_fn = evaluate(linear_apply(weights), images, labels, preprocess=to_float, progress=False)
  without = evaluate(linear_apply(weights), to_float(images), labels, progress=False)
  assert with_fn == without


@pytest.mark.parametrize("num_classes", [2, 4])
def test_top5_is_none_below_five_classes(num_classes):
  images, labels, weights = linear_problem(30, num_classes)
  result = evaluate(linear_apply(weights), images, labels, preprocess=to_float, progress=False)
  assert result["top5"] is None
  assert result["top1"] == pytest.approx(numpy_accuracy(images, labels, weights)[0])


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 48))
def test_result_does_not_depend_on_batch_size(n, batch_size):
  images, labels, weights = linear_problem(n)
  apply_fn = linear_apply(weights)
  reference = evaluate(apply_fn, images, labels, batch_size=64, preprocess=to_float, progress=False)
  result = evaluate(apply_fn, images, labels, batch_size=batch_size, preprocess=to_float,
                    progress=False)
  assert result == reference
  assert 0 <= result["top1"] <= result["top5"] <= 100


def test_four_devices_match_one_device():
  """Batch 10 on 4 devices: every batch is padded to 12 rows, padded rows not counted."""
  images, labels, weights = linear_problem(37)
  expected = evaluate(linear_apply(weights), images, labels, batch_size=10, preprocess=to_float,
                      progress=False)
  script = f"""
import json, sys
import jax, numpy as np
sys.path.insert(0, {os.path.join(REPO_ROOT, 'tests')!r})
from test_evaluate import linear_problem, linear_apply, to_float
from rapq_jax.evaluate import evaluate
assert jax.device_count() == 4, jax.devices()
images, labels, weights = linear_problem(37)
print(json.dumps(evaluate(linear_apply(weights), images, labels, batch_size=10,
                          preprocess=to_float, progress=False)))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def _identity(x):
  return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize("images,labels,kwargs,match", [
    (np.zeros((4, 8, 8), np.float32), np.zeros(4, int), {}, r"4-D NHWC.*\(4, 8, 8\)"),
    (np.zeros((0, 2, 2, 3), np.float32), np.zeros(0, int), {}, r"at least one image"),
    (np.zeros((4, 2, 2, 3), np.float32), np.zeros((4, 1), int), {}, r"1-D.*\(4, 1\)"),
    (np.zeros((4, 2, 2, 3), np.float32), np.zeros(3, int), {}, r"3 labels for 4 images"),
    (np.zeros((4, 2, 2, 3), np.float32), np.zeros(4, np.float32), {}, r"integers.*float32"),
    (np.zeros((4, 2, 2, 3), np.float32), np.array([0, 1, 12, -1]), {}, r"\[0, 12\).*\[12, -1\]"),
    (np.zeros((4, 2, 2, 3), np.float32), np.zeros(4, int), {"batch_size": 0}, r"positive int.*0"),
    (np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4, int), {}, r"float.*uint8.*preprocess="),
])
def test_rejects_bad_inputs(images, labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    evaluate(_identity, images, labels, progress=False, **kwargs)


def test_rejects_logits_that_are_not_2d():
  with pytest.raises(ValueError, match=r"logits \[4, num_classes\].*\(4, 2, 2, 3\)"):
    evaluate(lambda x: x, np.zeros((4, 2, 2, 3), np.float32), np.zeros(4, int), progress=False)
