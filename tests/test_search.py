"""Specification of rapq_jax.search: network-wide coordinate descent over integer
exponent offsets. A search never increases its objective, which is that of the deployed
integer model (``quantized.apply``), keeps every exponent an integer, is deterministic,
walks an exponent several steps in one visit and reports a search stopped at its sweep
limit; ``shift_states`` adds the offsets exactly."""
import dataclasses
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nets import folded, random_variables

from rapq_jax import config, objective, ptq, quantized, search
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.network import network_apply

HW = 16


@pytest.fixture(scope="module")
def problem():
  """A tiny folded CIFAR ResNet with naive (nearest-PoT, round-to-nearest) states."""
  model = CifarResNet(num_blocks=1)
  net = folded(model, random_variables(model, HW), HW)
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


def deployed(net, states, specs):
  """The deployed model of hard states, as ``rapq_jax.ptq`` builds it."""
  return quantized.from_states(net, states, specs, {"test": True})


def objective_of(net, states, specs, x, fp_logits):
  logits = quantized.apply(deployed(net, states, specs), x)
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


def test_objective_is_the_deployed_models(problem):
  """The reported objectives are those of the deployed integer models of the states
  before and after (``quantized.apply`` of ``quantized.from_states``). Their logits are
  exact (integers times powers of two), so the search's logits equal the model's bit
  for bit. The KL of those identical logits is then computed in two XLA programs whose
  log-softmax, exp and sums are fused and reduced in different orders (measured: 16
  float32 ulps apart), hence rtol 1e-5, about 100 ulps; a changed exponent moves the
  objective by far more (percent)."""
  net, states, specs, x, fp_logits, result = problem
  for st, value in ((states, result.before), (result.states, result.after)):
    np.testing.assert_array_equal(
        jax.jit(lambda n, s: search.deployed_logits(n, s, specs, x))(net, st),
        quantized.apply(deployed(net, st, specs), x))
    np.testing.assert_allclose(value, objective_of(net, st, specs, x, fp_logits), rtol=1e-5)


def reference_search(net, states, specs, x, fp_logits, names, *, max_sweeps, reach):
  """The coordinate descent ``search`` documents, written plainly: every candidate is
  scored by a whole forward pass of its deployed model (no outputs reused), and it stops
  at the end of a sweep that moved nothing. Returns the offsets, the objective and the
  candidates scored up to where every quantizer had been visited without a move since
  the last move (the search's stopping point: the rest of that sweep moves nothing)."""
  value = lambda o: objective_of(net, search.shift_states(states, names, jnp.asarray(o)),
                                 specs, x, fp_logits)
  offsets = np.zeros(len(names), np.int32)
  best = value(offsets)
  scored, checked, stop_at = 0, 0, None
  for _ in range(max_sweeps):
    changed = False
    for q in range(len(names)):
      k = 0
      for step in (1, -1):
        while k < reach:
          cand = offsets.copy()
          cand[q] += step
          v = value(cand)
          scored += 1
          if not v < best:
            break
          offsets, best, k, changed = cand, v, k + 1, True
        if k:
          break
      # A walk that stopped at reach still improving leaves its quantizer unchecked.
      checked = checked + 1 if not k else (0 if k == reach else 1)
      if checked >= len(names) and stop_at is None:
        stop_at = scored
    if not changed:
      break
  return offsets, best, scored if stop_at is None else stop_at


@pytest.mark.parametrize("reach", [1, 8])
def test_search_takes_the_moves_of_a_search_without_reused_outputs(problem, reach):
  """The search scores a move of one unit's quantizer reusing the outputs of the units
  before it; its moves are those of the plain coordinate descent, and it stops as soon as
  the plain one has converged instead of finishing a sweep that moves nothing."""
  net, states, specs, x, fp_logits, result = problem
  for sweeps in (3, 50):
    offsets, best, scored = reference_search(net, states, specs, x, fp_logits, result.names,
                                             max_sweeps=sweeps, reach=reach)
    res = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True,
                                  max_sweeps=sweeps, reach=reach)
    np.testing.assert_array_equal(res.offsets, offsets)
    np.testing.assert_allclose(res.after, best, rtol=1e-5)
    assert res.evaluations == scored


def test_unit_outputs_take_the_units_before_start_from_the_cache(problem):
  """``quantized.unit_outputs(qm, x, cached, start)``: the units before ``start`` are
  read from ``cached``, not computed (here a marker for all but the last of them), and
  the others equal the whole forward pass."""
  net, states, specs, x, _, _ = problem
  qm = deployed(net, states, specs)
  outputs = jax.jit(quantized.unit_outputs)
  full = outputs(qm, x)
  np.testing.assert_array_equal(full[-1], quantized.apply(qm, x))
  for start in range(len(full) + 1):
    cached = tuple(jnp.full_like(o, 7.0) if i < start - 1 else o for i, o in enumerate(full))
    got = outputs(qm, x, cached, jnp.int32(start))
    for i, (g, c, f) in enumerate(zip(got, cached, full)):
      np.testing.assert_array_equal(g, c if i < start else f, err_msg=f"unit {i}, start {start}")


def test_search_returns_integral_exponents(problem):
  _, states, _, _, _, result = problem
  chex.assert_type(result.offsets, jnp.int32)
  chex.assert_shape(result.offsets, (len(result.names),))
  assert np.any(result.offsets != 0)
  for (unit, kind, name), offset in zip(result.names, np.asarray(result.offsets)):
    new = np.asarray(result.states[unit][kind][name]["exp"])
    old = np.asarray(states[unit][kind][name]["exp"])
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


def test_folds_take_only_moves_that_lower_every_part(problem):
  """folds=2: the result lowers the objective on each half of the images, and where the
  search has converged no single +-1 step of any quantizer lowers it on both halves."""
  net, states, specs, x, fp_logits, _ = problem
  halves = [(x[:16], fp_logits[:16]), (x[16:], fp_logits[16:])]
  res = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True,
                                max_sweeps=20, folds=2)
  assert not res.capped and np.any(res.offsets != 0)
  start = [objective_of(net, states, specs, *h) for h in halves]
  end = [objective_of(net, res.states, specs, *h) for h in halves]
  assert all(e < s for e, s in zip(end, start)), (start, end)
  np.testing.assert_allclose(res.after, np.mean(end), rtol=1e-5)
  for i in range(len(res.names)):
    for step in (1, -1):
      moved = search.shift_states(res.states, res.names,
                                  jnp.asarray(np.eye(len(res.names), dtype=np.int32)[i] * step))
      values = [objective_of(net, moved, specs, *h) for h in halves]
      assert not all(v < e * (1 - 1e-5) for v, e in zip(values, end)), (res.names[i], step)


def per_image(net, states, specs, x, fp_logits):
  logits = quantized.apply(deployed(net, states, specs), x)
  return np.asarray(objective.sample_disagreement(logits, fp_logits, "kl"), np.float64)


def test_confidence_takes_only_moves_that_lower_the_objective_significantly(problem):
  """confidence=1: where the search has converged, no single +-1 step of any quantizer
  lowers the mean KL by more than one standard error of its per-image change; it ends
  below where it started. At confidence 0 the search is the plain one; with an
  unreachable confidence nothing moves."""
  net, states, specs, x, fp_logits, plain = problem
  res = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True,
                                max_sweeps=20, confidence=1.0)
  assert not res.capped and np.any(res.offsets != 0) and res.after < res.before
  end = per_image(net, res.states, specs, x, fp_logits)
  np.testing.assert_allclose(res.after, end.mean(), rtol=1e-5)
  for i in range(len(res.names)):
    for step in (1, -1):
      moved = search.shift_states(res.states, res.names,
                                  jnp.asarray(np.eye(len(res.names), dtype=np.int32)[i] * step))
      d = per_image(net, moved, specs, x, fp_logits) - end
      assert d.mean() + d.std(ddof=1) / np.sqrt(d.size) >= -1e-6, (res.names[i], step)
  zero = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True,
                                 confidence=0.0)
  np.testing.assert_array_equal(zero.offsets, plain.offsets)
  assert zero.after == plain.after
  assert np.any(plain.offsets != 0)
  never = search.search_exponents(net, states, specs, x, fp_logits, weights=True, acts=True,
                                  confidence=1e6)
  assert not np.any(never.offsets) and never.after == never.before


@pytest.mark.parametrize("confidence", [-1.0, float("nan")])
def test_confidence_must_be_a_number_at_least_zero(problem, confidence):
  net, states, specs, x, fp_logits, _ = problem
  with pytest.raises(ValueError, match=f"confidence = {confidence}"):
    search.search_exponents(net, states, specs, x, fp_logits, weights=False, acts=True,
                            confidence=confidence)


def test_folds_must_divide_the_images(problem):
  net, states, specs, x, fp_logits, _ = problem
  with pytest.raises(ValueError, match="folds = 3"):
    search.search_exponents(net, states, specs, x, fp_logits, weights=False, acts=True, folds=3)


def test_shift_states_adds_offsets_exactly(problem):
  _, states, _, _, _, result = problem
  names = result.names
  offsets = jnp.asarray(np.random.default_rng(0).integers(-3, 4, len(names)), jnp.int32)
  before = jax.tree.map(np.array, states)
  shifted = search.shift_states(states, names, offsets)
  chex.assert_trees_all_equal(jax.tree.map(np.array, states), before)   # pure
  assert jax.tree.structure(shifted) == jax.tree.structure(states)
  for (unit, kind, name), offset in zip(names, np.asarray(offsets)):
    old = states[unit][kind][name]
    new = shifted[unit][kind][name]
    chex.assert_type(new["exp"], jnp.float32)
    np.testing.assert_array_equal(new["exp"], np.asarray(old["exp"]) + offset)
    for key in set(old) - {"exp"}:
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


def only(specs, keep):
  """``specs`` with every quantizer but ``keep`` ((unit, kind, name)) at 8 bits."""
  out = {}
  for u, (w, a) in specs.items():
    out[u] = tuple({n: sp if (u, kind, n) == keep else dataclasses.replace(sp, bits=8)
                    for n, sp in d.items()} for kind, d in (("w", w), ("a", a)))
  return out


@pytest.mark.parametrize("reach", [1, 8])
def test_walk_reaches_an_exponent_several_steps_away(problem, reach):
  """The stem's output activation started 4 steps too fine (heavy clipping) with every
  other quantizer at 8 bits: the objective falls at each step back towards a minimum
  several steps away. One sweep with reach 8 walks all the way to it; a +-1 move
  (reach 1) gets one step."""
  net, states, specs, x, fp_logits, _ = problem
  name = ("conv1", "a", "out")
  specs = only(specs, name)
  start = search.shift_states(states, (name,), jnp.array([-4], jnp.int32))
  profile = [objective_of(net, search.shift_states(start, (name,), jnp.array([k], jnp.int32)),
                          specs, x, fp_logits) for k in range(9)]
  best = int(np.argmin(profile))
  assert best >= 2 and np.all(np.diff(profile[:best + 1]) < 0), profile   # the case holds
  result = search.search_exponents(net, start, specs, x, fp_logits, weights=True, acts=True,
                                   max_sweeps=1, reach=reach, below_bits=8)
  assert result.names == (name,)
  np.testing.assert_array_equal(result.offsets, [min(best, reach)])
  np.testing.assert_allclose(result.after, profile[min(best, reach)], rtol=1e-5)
  # Capped unless the walk ended on a step that did not lower the objective: then the one
  # quantizer is at its minimum and the search has converged within its one sweep.
  assert result.sweeps == 1 and result.capped == (best >= reach)


def test_sweep_limit_is_reported(problem):
  """A search stopped by max_sweeps after a sweep that moved an exponent is capped; one
  that ran to convergence is not, and a further sweep from its result moves nothing."""
  net, states, specs, x, fp_logits, result = problem
  assert result.sweeps == 3 and result.capped
  converged = search.search_exponents(net, states, specs, x, fp_logits, weights=True,
                                      acts=True, max_sweeps=50)
  assert converged.sweeps < 50 and not converged.capped
  assert converged.after <= result.after
  again = search.search_exponents(net, converged.states, specs, x, fp_logits, weights=True,
                                  acts=True, max_sweeps=1)
  assert again.sweeps == 1 and not again.capped and not np.any(again.offsets)
  assert again.after == again.before == converged.after


def test_run_search_warns_once_when_capped(problem, caplog, capsys):
  """The pipeline's search summary says whether the search was capped, and a capped
  search logs one warning line; with progress on, one line says it starts and one what
  it did."""
  net, states, specs, x, fp_logits, _ = problem
  cfg = config.for_method("rapq", search_sweeps=1, search_samples=x.shape[0])
  images = dict(rows=[0, x.shape[0]], reconstruction_rows=[0, 0], held_out=True)
  with caplog.at_level(logging.WARNING):
    _, info = ptq._run_search(net, states, specs, x, fp_logits, cfg, weights=True,
                              when="after reconstruction", images=images, progress=True)
  assert info["capped"] and info["sweeps"] == 1 and info["images"] == images
  assert [r.getMessage() for r in caplog.records] == [
      f"exponent search after reconstruction stopped at search_sweeps = 1 with exponents "
      f"still moving ({len(info['moved'])} moved)"]
  assert capsys.readouterr().out.splitlines() == [
      f"  exponent search after reconstruction: {x.shape[0]} images, at most 1 sweeps ...",
      f"  exponent search after reconstruction: kl {info['before']:.4g} -> "
      f"{info['after']:.4g}, {len(info['moved'])} moved, {info['seconds']:.0f} s"]
