"""Specification of the PTQ pipeline (rapq_jax.ptq, reconstruct, quantized, config), end
to end on a tiny CIFAR ResNet (one block per stage) with random weights and random
calibration images.

Every method runs; power-of-two methods return a ``QuantizedModel`` of integers and
int32 exponents whose simulated inference equals the integer-only program bit for bit;
every method's result reproduces its hard quantizer states (checked against inference
written out from the states); reconstruction lowers its objective; the same config and
seed reproduce the same integers bit for bit.
"""
import dataclasses
import re

import chex
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from nets import folded, random_variables

from rapq_jax import (config, fake_quant, integer, objective, pot, ptq, quantized,
                      reconstruct, resume, search)
from rapq_jax.models.cifar_resnet import CifarResNet
from rapq_jax.network import Network, network_apply, unit_apply
from rapq_jax.units import Layer, Unit

HW, N_CALIB = 16, 64
SMALL = dict(weight_iters=30, act_iters=10, exp_warm_iters=10, batch_size=8, search_samples=32)
POT_METHODS = ("naive", "brecq_pot", "rapq")


def dequantized_params(model: quantized.QuantizedModel) -> dict:
  """Float kernels ``(q - zp) * 2**e`` and biases, shaped like ``Network.params``."""
  return {u: {r: {"kernel": pot.dequantize(w["q"].astype(jnp.int32), w["e"], w["zp"]),
                  "bias": w["bias"]} for r, w in layers.items()}
          for u, layers in model.weights.items()}


@pytest.fixture(scope="module")
def tiny():
  model = CifarResNet(num_blocks=1)
  net = folded(model, random_variables(model, HW), HW)
  calib = jax.random.normal(jax.random.PRNGKey(0), (N_CALIB, HW, HW, 3), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, HW, HW, 3), jnp.float32)
  return net, calib, x


@pytest.fixture(scope="module")
def run(tiny):
  """method -> PTQResult (each method quantized once per module)."""
  net, calib, _ = tiny
  cache = {}

  def get(method):
    if method not in cache:
      cache[method] = ptq.quantize_network(net, calib, config.for_method(method, **SMALL),
                                           progress=False, metadata={"method": method})
    return cache[method]

  return get


# ------------------------------------------------------------------ end to end

@pytest.mark.slow(seconds=25)
def test_learned_exponents_end_as_exact_integers(tiny):
  """The paper's relaxation (learn_exponent=True): after the warm phase every weight
  exponent is hardened, so the result is still an exact power-of-two model."""
  net, calib, x = tiny
  result = ptq.quantize_network(net, calib, config.for_method("rapq", learn_exponent=True, **SMALL),
                                progress=False)
  quantized.check_power_of_two(result.model)
  for unit in result.states.values():
    for state in unit["w"].values():
      assert "v" not in state
      np.testing.assert_array_equal(state["exp"], np.round(state["exp"]))
  chex.assert_tree_all_finite(result.apply(x))


@pytest.mark.parametrize("method", config.METHODS)
@pytest.mark.slow(seconds=10)
def test_every_method_runs(tiny, run, method):
  net, _, x = tiny
  result = run(method)
  logits = result.apply(x)
  chex.assert_shape(logits, (x.shape[0], 10))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  assert set(result.states) == set(result.specs) == set([u.name for u in net.units])
  cfg = config.for_method(method, **SMALL)
  if cfg.reconstruct:
    assert list(result.report["units"]) == [u.name for u in net.units]
    for name, info in result.report["units"].items():
      assert info["history"]["weights"][-1][0] == cfg.weight_iters   # the last iteration
      assert all(np.isfinite(v) for _, v in info["history"]["weights"])
  else:
    assert result.report["units"] == {}
  assert (result.model is None) == (method == "brecq")
  if method == "rapq":
    assert result.report["search"] == {}              # no search by default
    for name, unit_info in result.report["units"].items():
      assert unit_info["p"] in ((2.0,) if name == "linear" else (1.0, 1.1))
      # The value before rounding is reported too: p only says which side of 1.05 it is.
      assert round(unit_info["p_unrounded"], 1) == unit_info["p"]
      assert unit_info["p_unrounded"] == ptq.unit_lp(result.network, name, cfg,
                                                      rounded=False)
  assert result.report["protocol"]["name"] == "strict"
  # rapq quantizes the stream-aligned network, the same FP function with other
  # parameters; the baselines quantize the network as folded.
  assert result.report["align"]["mode"] == ("stream" if method == "rapq" else "none")
  if method == "rapq":
    assert result.report["align"]["factors"]["stream"][0] != 1.0
    assert not np.array_equal(result.network.params["layer1_0"]["conv2"]["kernel"],
                              net.params["layer1_0"]["conv2"]["kernel"])
    np.testing.assert_allclose(network_apply(result.network, x), network_apply(net, x),
                               rtol=1e-4, atol=1e-4)
  else:
    assert result.network is net


def test_search_scores_held_out_images_in_deployed_arithmetic(tiny, monkeypatch):
  """rapq (search after reconstruction, search_holdout): the quantizers are initialised
  and every unit reconstructed on the first 32 of the 64 calibration images only, and
  the search scores the other 32 (as the report says); the search's final objective is
  the KL of the returned model's ``quantized.apply`` logits on those images (rtol 1e-5:
  identical logits, the KL's float32 reduction fused differently, see
  tests/test_search.py). The initialisation computes no activation states: nothing
  before reconstruction reads them."""
  net, calib, _ = tiny
  seen = {"init": [], "units": [], "search": []}
  init_all, reconstruct, search_exponents = ptq._init_all, ptq.reconstruct_unit, search.search_exponents

  def record(key, fn, position):
    def wrapped(*args, **kw):
      seen[key].append(np.asarray(args[position]))
      return fn(*args, **kw)
    return wrapped

  def init_recording(*args, acts):
    seen["init"].append((np.asarray(args[2]), acts))
    return init_all(*args, acts=acts)

  monkeypatch.setattr(ptq, "_init_all", init_recording)
  monkeypatch.setattr(ptq, "reconstruct_unit", record("units", reconstruct, 7))
  monkeypatch.setattr(search, "search_exponents", record("search", search_exponents, 3))
  result = ptq.quantize_network(net, calib, config.for_method("rapq", search="after", **SMALL),
                                progress=False)
  n, held = N_CALIB, SMALL["search_samples"]
  info = result.report["search"]["after"]
  assert info["images"] == dict(rows=[n - held, n], reconstruction_rows=[0, n - held],
                                held_out=True)
  fit, scored = np.asarray(calib[:n - held]), np.asarray(calib[n - held:])
  ((init_x, init_acts),), (search_x,) = seen["init"], seen["search"]
  np.testing.assert_array_equal(init_x, fit)
  assert not init_acts     # reconstruction initialises each unit's activations itself
  np.testing.assert_array_equal(seen["units"][0], fit)          # the first unit's input
  assert len(seen["units"]) == len(net.units)
  assert all(x.shape[0] == n - held for x in seen["units"])
  np.testing.assert_array_equal(search_x, scored)
  assert not {r.tobytes() for r in fit} & {r.tobytes() for r in scored}   # disjoint rows
  x = calib[n - held:]
  deployed = objective.logits_disagreement(quantized.apply(result.model, x),
                                           network_apply(net, x), "kl")
  np.testing.assert_allclose(info["after"], deployed, rtol=1e-5)
  assert info["after"] <= info["before"] and isinstance(info["capped"], bool)


def test_search_before_and_after_reconstruction(tiny, monkeypatch):
  """search='both': the weight/activation search on round-to-nearest states, then the
  activation search after reconstruction; neither raises its objective. The
  initialisation computes activation states for the search before; without them (where
  nothing reads them) it gives the same weight states bit for bit."""
  net, calib, _ = tiny
  calls, init_all = [], ptq._init_all

  def init_recording(*args, acts):
    calls.append((args, acts, init_all(*args, acts=acts)))
    return calls[-1][2]

  monkeypatch.setattr(ptq, "_init_all", init_recording)
  result = ptq.quantize_network(net, calib, config.for_method("rapq", search="both", **SMALL),
                                progress=False)
  ((args, acts, with_acts),) = calls
  assert acts and any(s["a"] for s in with_acts.values())
  without = init_all(*args, acts=False)
  chex.assert_trees_all_equal({u: s["w"] for u, s in with_acts.items()},
                              {u: s["w"] for u, s in without.items()})
  assert all(s["a"] == {} for s in without.values())
  assert set(result.report["search"]) == {"before", "after"}
  for info in result.report["search"].values():
    assert info["after"] <= info["before"]
  quantized.check_power_of_two(result.model)


@pytest.mark.slow(seconds=25)
def test_search_rounds_reconstruct_what_the_search_changed(tiny, monkeypatch, tmp_path):
  """search_rounds=2 (at W4A2, where the tiny net's searches move exponents): each round
  after the first learns again, weights stage only, the rounding of every unit after
  the first unit the last search moved, on activation exponents where that search left
  them, then searches again (a round follows only a search that moved). The result is the
  round whose search ended lowest on the held-out images, a power-of-two model whose
  held-out KL is that search's. Each round's units are stored (``round<r>_<unit>``): a
  second run on the store reconstructs nothing and ends bit-identical."""
  net, calib, _ = tiny
  calls, found = [], []
  reconstruct, search_exponents = ptq.reconstruct_unit, search.search_exponents

  def recording(unit, params, bn, wstates, astates, *args, **kw):
    calls.append((unit.name, kw["weights"], kw["acts"], astates))
    return reconstruct(unit, params, bn, wstates, astates, *args, **kw)

  def searching(*args, **kw):
    found.append(search_exponents(*args, **kw))
    return found[-1]

  monkeypatch.setattr(ptq, "reconstruct_unit", recording)
  monkeypatch.setattr(search, "search_exponents", searching)
  cfg = config.for_method("rapq", search="after", search_rounds=2, abits=2,
                          align_scales="none", **SMALL)
  result = ptq.quantize_network(net, calib, cfg, progress=False, store=resume.Store(tmp_path))
  searches, names = result.report["search"], [u.name for u in net.units]
  assert searches["after"]["moved"], "the first search moved nothing: no round to test"
  rounds = [k for k in searches if k != "after"]
  assert rounds == [f"round_{r}" for r in range(2, 2 + len(rounds))] and rounds
  assert len(found) == 1 + len(rounds)
  assert [c[0] for c in calls[:len(names)]] == names
  later, previous = calls[len(names):], (searches["after"], found[0])
  for key, res in zip(rounds, found[1:]):
    assert previous[0]["moved"]                   # a round follows a search that moved
    first = min(names.index(m.split("/")[0]) for m in previous[0]["moved"])
    redone = names[first + 1:]
    assert searches[key]["rereconstructed"] == redone
    now, later = later[:len(redone)], later[len(redone):]
    assert [c[:3] for c in now] == [(u, True, False) for u in redone]
    for name, _, _, astates in now:             # activation exponents as the search left them
      chex.assert_trees_all_equal(astates, previous[1].states[name]["a"])
    assert searches[key]["after"] <= searches[key]["before"]
    previous = (searches[key], res)
  assert later == []
  assert [o for o in result.report["protocol"]["order"] if "round" in o[1]] == [
      [u, f"weights (round {k.split('_')[1]})"] for k in rounds
      for u in searches[k]["rereconstructed"]]
  ends = [searches[k]["after"] for k in ["after"] + rounds]
  kept = ends.index(min(ends))
  assert [searches[k]["kept"] for k in ["after"] + rounds] == [
      i == kept for i in range(len(ends))]
  chex.assert_trees_all_equal(result.states, found[kept].states)
  quantized.check_power_of_two(result.model)
  x = calib[N_CALIB - SMALL["search_samples"]:]
  np.testing.assert_allclose(min(ends), objective.logits_disagreement(
      quantized.apply(result.model, x), network_apply(net, x), "kl"), rtol=1e-5)
  assert {p.name for p in tmp_path.iterdir()} >= {
      f"round{k.split('_')[1]}_{u}" for k in rounds for u in searches[k]["rereconstructed"]}
  done = len(calls)
  again = ptq.quantize_network(net, calib, cfg, progress=False, store=resume.Store(tmp_path))
  assert len(calls) == done
  chex.assert_trees_all_equal(again.states, result.states)
  assert again.report["units"] == result.report["units"]


@pytest.mark.slow(seconds=10)
def test_pot_parts_puts_powers_of_two_on_one_side_only(tiny):
  """pot_parts='weights' (the diagnostic split of the power-of-two cost): every weight
  exponent an integer, the activation steps float and learned as float BRECQ's are; the
  result is no power-of-two model. pot_parts='acts' gives the other side's specs,
  'outputs' and 'inner' split the activation points between each unit's output and the
  rest."""
  net, calib, x = tiny
  cfg = config.for_method("brecq_pot", pot_parts="weights", **SMALL)
  assert not cfg.pot_model and config.for_method("brecq_pot").pot_model
  result = ptq.quantize_network(net, calib, cfg, progress=False)
  assert result.model is None
  chex.assert_tree_all_finite(result.apply(x))
  moved = []
  for name, (wspecs, aspecs) in result.specs.items():
    assert all(s.pot for s in wspecs.values()) and not any(s.pot for s in aspecs.values())
    for state in result.states[name]["w"].values():
      np.testing.assert_array_equal(state["exp"], np.round(state["exp"]))
    moved += [float(st["exp"]) for st in result.states[name]["a"].values()]
  assert any(e != round(e) for e in moved)           # the float steps learned off the grid
  for wspecs, aspecs in ptq.unit_specs(net, config.for_method(
      "brecq_pot", pot_parts="acts")).values():
    assert not any(s.pot for s in wspecs.values()) and all(s.pot for s in aspecs.values())
  points = {}
  for parts in ("outputs", "inner"):
    specs = ptq.unit_specs(net, config.for_method("brecq_pot", pot_parts=parts))
    assert not any(s.pot for wspecs, _ in specs.values() for s in wspecs.values())
    points[parts] = {(u, a) for u, (_, aspecs) in specs.items()
                     for a, s in aspecs.items() if s.pot}
  every = {(u, a) for u, (_, aspecs) in ptq.unit_specs(net, config.for_method("brecq_pot")).items()
           for a in aspecs}
  assert points["outputs"] == {(u, a) for u, a in every if a == "out"} != set()
  assert points["inner"] == every - points["outputs"] and ("conv1", "input") in points["inner"]


@pytest.mark.slow(seconds=10)
def test_rapq_pot_parts_split_the_cost_on_rapqs_aligned_network(tiny, run):
  """rapq's split of the cost (rapq_pot_outputs): the network is rescaled as rapq's is,
  each unit's output gets an exact power-of-two scale at rapq's floor/ceil exponent, and
  every weight and inner activation scale stays float."""
  net, calib, x = tiny
  cfg = config.for_method("rapq", pot_parts="outputs", **SMALL)
  assert cfg.align_scales == "stream" and cfg.act_exp_init == "lp" and not cfg.pot_model
  result = ptq.quantize_network(net, calib, cfg, progress=False)
  assert result.model is None
  assert result.report["align"] == run("rapq").report["align"]
  assert result.report["align"]["factors"]["stream"][0] != 1.0
  chex.assert_tree_all_finite(result.apply(x))
  for name, (wspecs, aspecs) in result.specs.items():
    assert not any(s.pot for s in wspecs.values())
    assert {a for a, s in aspecs.items() if s.pot} == ({"out"} & set(aspecs))
    for a, st in result.states[name]["a"].items():
      if aspecs[a].pot:
        e = np.log2(np.asarray(fake_quant.act_scale(st, aspecs[a])))
        np.testing.assert_array_equal(e, np.round(e))


@pytest.mark.parametrize("method", POT_METHODS)
def test_pot_model_integers_and_exponents(tiny, run, method):
  net, _, _ = tiny
  model = run(method).model
  quantized.check_power_of_two(model)
  table = model.bit_table()
  cfg = config.for_method(method, **SMALL)
  for unit in net.units:
    for layer in unit.layers:
      w = model.weights[unit.name][layer.role]
      bits, signed = table[f"{unit.name}/{layer.role}"]
      edge = unit.name in (net.units[0].name, net.units[-1].name)
      assert bits == (cfg.first_last_bits if edge else cfg.wbits) and signed == cfg.weight_signed
      kernel = net.params[unit.name][layer.role]["kernel"]
      chex.assert_shape(w["q"], kernel.shape)
      chex.assert_type(w["q"], jnp.int8 if signed else jnp.uint8)
      chex.assert_shape([w["e"], w["zp"]], (kernel.shape[-1],))
      chex.assert_type([w["e"], w["zp"]], jnp.int32)
      qmin, qmax = pot.int_range(bits, signed)
      q = np.asarray(w["q"], np.int32)
      assert q.min() >= qmin and q.max() <= qmax
      assert np.all((w["zp"] >= 0) & (w["zp"] <= qmax))
      assert np.all((w["e"] >= pot.EXP_MIN) & (w["e"] <= pot.EXP_MAX))
    for point, e in model.acts[unit.name].items():
      chex.assert_shape(e, ())
      chex.assert_type(e, jnp.int32)
  # Dequantized kernels are exact integer multiples of powers of two.
  for unit, layers in dequantized_params(model).items():
    for role, p in layers.items():
      w = model.weights[unit][role]
      scaled = np.asarray(p["kernel"]) / np.ldexp(1.0, np.asarray(w["e"]))
      np.testing.assert_array_equal(scaled, np.round(scaled))
  assert model.info == {"method": method}


@pytest.mark.parametrize("method", POT_METHODS)
def test_apply_equals_integer_only_inference(tiny, run, method):
  """``result.apply`` (the float32 simulation) gives the logits of the lowered
  integer-only program (int32 convolutions, arithmetic shifts) bit for bit."""
  _, _, x = tiny
  result = run(method)
  program = integer.lower(result.model)
  assert program.spec["checks"]["exact_float32"]          # the documented bound is then 0
  np.testing.assert_array_equal(np.asarray(result.apply(x)),
                                np.asarray(integer.apply(program, x)))


def fake_quant_logits(model, x):
  """Float fake-quant inference of a QuantizedModel: kernels ``(q - zp) * 2**e`` with
  their biases, activations ``pot.fake_quant`` at their exponents."""
  table = model.bit_table()
  net = Network(model.units, dequantized_params(model), {})

  def aq_for(u):
    def aq(point, h):
      bits, signed = table[f"{u}/@{point}"]
      return pot.fake_quant(h, model.acts[u][point], bits, signed=signed)
    return aq

  return network_apply(net, x, None, aq_for)


def _step(log2s, is_pot: bool):
  """A quantizer's step size: exactly ``2**e`` (ldexp of the integer) for power-of-two
  quantizers, ``exp2`` of the real log2 for float ones."""
  if is_pot:
    return jnp.ldexp(jnp.float32(1), jnp.round(log2s).astype(jnp.int32))
  return jnp.exp2(log2s)


def states_logits(net, states, specs, x):
  """Hard fake-quant inference written out from the quantizer states, without the
  library's quantizer code: kernel ``(clip(floor(w / s) + [alpha >= 0] + zp) - zp) * s``
  (round to nearest without ``alpha``), zero point ``clip(round(-lo / s), 0, qmax)``
  (unsigned) or 0, activation ``clip(round(h / s_a)) * s_a``; ``s = 2**log2s``,
  ``s_a = 2**t`` (integer exponents for power-of-two quantizers)."""
  params = {}
  for u, (wspecs, _) in specs.items():
    params[u] = {}
    for role, spec in wspecs.items():
      w, st = net.params[u][role]["kernel"], states[u]["w"][role]
      qmin, qmax = pot.int_range(spec.bits, spec.signed)
      s = _step(st["exp"], spec.pot)
      zp = 0.0 if spec.signed else jnp.clip(jnp.round(-st["lo"] / s), 0, qmax)
      q = jnp.floor(w / s) + (st["alpha"] >= 0) if "alpha" in st else jnp.round(w / s)
      params[u][role] = {"kernel": (jnp.clip(q + zp, qmin, qmax) - zp) * s,
                         "bias": net.params[u][role]["bias"]}

  def aq_for(u):
    def aq(point, h):
      spec = specs[u][1][point]
      qmin, qmax = pot.int_range(spec.bits, spec.signed)
      s = _step(states[u]["a"][point]["exp"], spec.pot)
      return jnp.clip(jnp.round(h / s), qmin, qmax) * s
    return aq

  return network_apply(Network(net.units, params, net.bn_targets), x, None, aq_for)


@pytest.mark.parametrize("method", config.METHODS)
def test_result_equals_hard_fake_quant_of_its_states(tiny, run, method):
  """What a method returns reproduces its final hard quantizer states: for power-of-two
  methods fake-quant inference of the model's integers and exponents, for float scales
  (brecq, no model) ``result.apply``, equals inference written out from the states."""
  net, _, x = tiny
  result = run(method)
  assert not any("v" in w for st in result.states.values() for w in st["w"].values())
  expected = states_logits(result.network, result.states, result.specs, x)
  got = result.apply(x) if result.model is None else jax.jit(fake_quant_logits)(result.model, x)
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-4)


def test_rapq_states_are_hard(run):
  result = run("rapq")
  for unit, state in result.states.items():
    for role, w in state["w"].items():
      assert "v" not in w
      np.testing.assert_array_equal(w["exp"], np.round(w["exp"]))
      np.testing.assert_array_equal(result.model.weights[unit][role]["e"], w["exp"])


def test_same_config_and_seed_give_identical_integers(tiny, run):
  net, calib, _ = tiny
  first = run("rapq").model
  again = ptq.quantize_network(net, calib, config.for_method("rapq", **SMALL), progress=False,
                               metadata={"method": "rapq"})
  chex.assert_trees_all_equal(again.model.weights, first.weights)
  chex.assert_trees_all_equal(again.model.acts, first.acts)
  assert again.model.bits == first.bits and again.model.metadata == first.metadata


def test_unit_specs_bit_widths(tiny):
  net, _, _ = tiny
  cfg = config.for_method("rapq", wbits=3, abits=5, first_last_bits=8)
  specs = ptq.unit_specs(net, cfg)
  assert list(specs) == [u.name for u in net.units]
  w_bits = {u: {r: s.bits for r, s in specs[u][0].items()} for u in specs}
  assert w_bits["conv1"] == {"conv": 8} and w_bits["linear"] == {"fc": 8}
  assert w_bits["layer2_0"] == {"conv1": 3, "conv2": 3}
  a = {u: {p: (s.bits, s.signed) for p, s in specs[u][1].items()} for u in specs}
  assert a["conv1"] == {"input": (8, True), "out": (5, False)}
  assert a["layer1_0"] == {"relu1": (5, False), "out": (5, False)}
  assert a["layer3_0"] == {"relu1": (5, False), "out": (8, False)}   # feeds the classifier
  assert a["linear"] == {}


# ------------------------------------------------------------------ official protocol

OFFICIAL = config.for_method("rapq", protocol="official", search="none", **SMALL)


@pytest.fixture(scope="module")
def official(tiny):
  """The 'official' protocol's result, and the inputs each reconstruction stage got:
  ``[(unit, 'weights' | 'acts', xs)]`` in call order."""
  net, calib, _ = tiny
  stages = []

  def recording(unit, params, bn, wstates, astates, wspecs, aspecs, xs, *args, **kw):
    stages.append((unit.name, "weights" if kw["weights"] else "acts", np.asarray(xs)))
    assert kw["weights"] != kw["acts"]                   # one stage per pass
    return reconstruct.reconstruct_unit(unit, params, bn, wstates, astates, wspecs, aspecs,
                                        xs, *args, **kw)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(ptq, "reconstruct_unit", recording)
    result = ptq.quantize_network(net, calib, OFFICIAL, progress=False)
  return result, stages


def test_official_protocol_order_weights_then_activations(tiny, official):
  """Every unit's weights in network order, then every unit's activations; the stem is
  in neither, the classifier (no activation quantizer) has no activation stage."""
  net, _, _ = tiny
  result, stages = official
  names = [u.name for u in net.units]
  expected = [[u, "weights"] for u in names[1:]] + [[u, "acts"] for u in names[1:-1]]
  assert [[u, s] for u, s, _ in stages] == expected
  assert result.report["protocol"]["order"] == expected
  assert result.report["protocol"]["not_reconstructed"] == [names[0]]
  assert list(result.report["units"]) == names[1:]
  for entry in result.report["units"].values():   # both stages in one entry
    assert entry["history"]["weights"][-1][0] == OFFICIAL.weight_iters
    # The activation stage ran on power-of-two exponents that its steps cannot move.
    assert entry["act_steps"] == 0 and entry["history"]["acts"] == []


def test_official_protocol_stage_inputs(tiny, official):
  """A weight stage's inputs come from the network with its weights quantized (the
  units before reconstructed) and float activations; an activation stage's from the
  network with every weight reconstructed and the activations before it quantized;
  the network input is float in both."""
  calib = tiny[1]
  result, stages = official
  net = result.network                       # the stream-aligned network it quantized
  cal_net = ptq.calibration_network(net, OFFICIAL)
  assert [a.name for a in cal_net.units[0].acts] == ["out"]
  hk = {u: fake_quant.hooks(s["w"], {p: s["a"][p] for p in result.specs[u][1] if p != "input"},
                             *result.specs[u], soft=False, acts_on=True)
        for u, s in result.states.items()}
  for i, (unit, stage, xs) in enumerate(stages):
    until = [u.name for u in net.units].index(unit)
    aq_for = (lambda u: hk[u][1]) if stage == "acts" else None
    expected = network_apply(cal_net, calib, lambda u: hk[u][0], aq_for, until=until)
    np.testing.assert_allclose(xs, expected, rtol=1e-5, atol=1e-5, err_msg=f"stage {i}")


def test_official_protocol_stem_round_to_nearest_at_8_bits(tiny, official):
  """The stem keeps round-to-nearest 8-bit weights; its output quantizer is 8-bit and
  keeps the exponent initialised on the stem's output for float inputs; the input is
  quantized (8-bit, signed) only in the returned model, as the report says."""
  calib = tiny[1]
  result, _ = official
  net = result.network                       # the stream-aligned network it quantized
  stem = net.units[0].name
  kernel = net.params[stem]["conv"]["kernel"]
  wspec = result.specs[stem][0]["conv"]
  rtn = fake_quant.init_weight(kernel, wspec, learn_rounding=False, p=OFFICIAL.scale_p,
                               exponent_choice=OFFICIAL.exp_init)
  for got, want in zip((result.model.weights[stem]["conv"][k] for k in ("q", "e", "zp")),
                       fake_quant.weight_integers(kernel, rtn, wspec)):
    np.testing.assert_array_equal(got, want)
  table = result.model.bit_table()
  assert table[f"{stem}/conv"] == (8, False) and table[f"{stem}/@out"] == (8, False)
  assert table[f"{stem}/@input"] == (8, True)
  assert table["layer1_0/@out"] == (OFFICIAL.abits, False)
  strict = ptq.unit_specs(net, config.for_method("rapq"))
  assert strict[stem][1]["out"].bits == OFFICIAL.abits        # strict: the stem's output at abits
  out_spec = result.specs[stem][1]["out"]
  h = jax.nn.relu(jax.lax.conv_general_dilated(
      calib[:ptq.INIT_SAMPLES], fake_quant.weight_fake_quant(kernel, rtn, wspec, soft=False),
      (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      + net.params[stem]["conv"]["bias"])
  assert int(result.model.acts[stem]["out"]) == int(fake_quant.act_exponent(
      fake_quant.init_act(h, out_spec, p=OFFICIAL.scale_p), out_spec))
  assert result.report["protocol"]["input"] == {"bits": 8, "in_calibration": False}


def test_official_protocol_p_is_2_for_stem_and_classifier(tiny, official):
  net, _, _ = tiny
  result, _ = official
  stem, head = net.units[0].name, net.units[-1].name
  assert ptq.unit_lp(net, stem, OFFICIAL) == ptq.unit_lp(net, head, OFFICIAL) == 2.0
  assert ptq.unit_lp(net, stem, config.for_method("rapq")) in (1.0, 1.1)   # strict: BN-derived
  assert result.report["units"][head]["p"] == 2.0
  assert {result.report["units"][u]["p"] for u in [u.name for u in net.units][1:-1]} <= {1.0, 1.1}


def test_official_protocol_model_is_integer_exact(tiny, official):
  """The returned model (input quantized) is a power-of-two model whose simulation
  equals the integer-only program bit for bit, as under 'strict'."""
  _, _, x = tiny
  result, _ = official
  quantized.check_power_of_two(result.model)
  program = integer.lower(result.model)
  assert program.spec["checks"]["exact_float32"]
  np.testing.assert_array_equal(np.asarray(result.apply(x)),
                                np.asarray(integer.apply(program, x)))


# ------------------------------------------------------------------ reconstruction

@pytest.fixture(scope="module")
def block(tiny):
  """One basic block (``layer1_0``) with its FP inputs/targets and initial states."""
  net, calib, _ = tiny
  cfg = config.for_method("brecq_pot", weight_iters=100, act_iters=0, batch_size=32, wbits=3)
  specs = ptq.unit_specs(net, cfg)
  unit = net.units[1]
  params = net.params[unit.name]
  fns = ptq.unit_fns(unit, specs, cfg)
  x_in = jax.jit(lambda n, x: network_apply(n, x, until=1))(net, calib)
  y_fp = fns.fp(params, x_in)
  w0, a0 = fns.init(params, x_in)
  return net, unit, params, cfg, specs[unit.name], fns.hard, x_in, y_fp, {"w": w0, "a": a0}


def test_reconstruction_decreases_objective(block, monkeypatch):
  """On one block, the recorded reconstruction loss falls from the first to the last
  record, and the hard-quantized block output is closer to the FP one after than with
  the initial round-to-nearest states."""
  net, unit, params, cfg, (wspecs, aspecs), hard, x_in, y_fp, start = block
  monkeypatch.setattr(reconstruct, "REPORT_EVERY", 10)
  result = reconstruct.reconstruct_unit(unit, params, net.bn_targets[unit.name], start["w"], start["a"],
                                        wspecs, aspecs, x_in, y_fp, cfg, 2.0,
                                        jax.random.PRNGKey(3), progress=False)
  steps, losses = zip(*result.history["weights"])
  assert steps == tuple(range(10, 101, 10))
  assert result.history["acts"] == []
  assert losses[-1] < 0.9 * losses[0]
  before = objective.lp_loss(hard(params, start, x_in), y_fp, 2.0)
  after = objective.lp_loss(hard(params, {"w": result.wstates, "a": result.astates}, x_in),
                            y_fp, 2.0)
  assert float(after) < 0.8 * float(before)
  assert result.seconds > 0
  # Power-of-two exponents stay exact integers, alpha keeps its shape.
  for role, w in result.wstates.items():
    np.testing.assert_array_equal(w["exp"], start["w"][role]["exp"])
    chex.assert_equal_shape([w["alpha"], params[role]["kernel"]])


def test_phases_are_pure_init_step_pairs_that_reconstruct_a_unit(block):
  """The weight and activation phases as optax-style pairs: ``init`` gives a NamedTuple
  state, ``step`` a new state without touching the old one (the same call twice gives the
  same state), and driving them by hand gives reconstruct_unit's states bit for bit."""
  net, unit, params, cfg, (wspecs, aspecs), _, x_in, y_fp, start = block
  # At this lr_a the activation steps could move an exponent, so they run.
  cfg = dataclasses.replace(cfg, weight_iters=6, act_iters=4, lr_a=0.3)
  bn, key = net.bn_targets[unit.name], jax.random.PRNGKey(3)
  result = reconstruct.reconstruct_unit(unit, params, bn, start["w"], start["a"], wspecs,
                                        aspecs, x_in, y_fp, cfg, 2.0, key, progress=False)
  xs, ys, (p, b, ws, acts) = reconstruct.place(x_in, y_fp, (params, bn, start["w"], start["a"]))
  shape, n = reconstruct.structural(unit), x_in.shape[0]
  ws_t, as_t = tuple(sorted(wspecs.items())), tuple(sorted(aspecs.items()))
  kw, ka = jax.random.split(key)
  weights = reconstruct.weight_phase(shape, ws_t, as_t, cfg, 2.0, False, n)
  state = weights.init(ws)
  assert isinstance(state, reconstruct.WeightPhaseState)
  assert all(set(s) == {"alpha"} for s in state.train.values())
  assert all("alpha" not in s for s in state.frozen.values())
  once, _ = weights.step(state, acts, p, b, xs, ys, kw, 0)
  again, _ = weights.step(state, acts, p, b, xs, ys, kw, 0)
  chex.assert_trees_all_equal(once, again)
  for it in range(cfg.weight_iters):
    state, _ = weights.step(state, acts, p, b, xs, ys, kw, it)
  chex.assert_trees_all_equal(state.wstates, result.wstates)
  activations = reconstruct.act_phase(shape, ws_t, as_t, cfg, 2.0, n)
  astate = activations.init(acts, state.wstates)
  for it in range(cfg.act_iters):
    astate, _ = activations.step(astate, state.wstates, p, xs, ys, ka, it)
  chex.assert_trees_all_equal(astate.astates, result.astates)


@jax.jit
def _adam_walk(grads, lrs):
  """Where the activation phase's optimizer takes a parameter from 0 given these
  gradients and per-step learning rates."""
  opt = reconstruct.act_optimizer(config.for_method("rapq"))

  def step(carry, g_lr):
    theta, state = carry
    state = state._replace(hyperparams={**state.hyperparams, "learning_rate": g_lr[1]})
    update, state = opt.update(g_lr[0], state, theta)
    return (optax.apply_updates(theta, update), state), None

  (theta, _), _ = jax.lax.scan(step, (jnp.float32(0), opt.init(jnp.float32(0))), (grads, lrs))
  return theta


WALK_STEPS = 64


@settings(max_examples=40, deadline=None)
@given(grads=hnp.arrays(np.float32, WALK_STEPS, elements=st.floats(-1e4, 1e4, width=32)),
       lr=st.floats(1e-5, 1.0), iters=st.integers(1, WALK_STEPS))
def test_activation_steps_move_no_parameter_beyond_the_drift_bound(grads, lr, iters):
  """Whatever the gradients, ``act_iters`` steps of the activation phase's Adam on its
  cosine schedule move a parameter by at most ``act_drift_bound``. The bound is tight:
  gradients growing by b2 / b1 per step (its Cauchy-Schwarz equality case) move it, in
  all, at least 99 % of the bound's share of the last step alone."""
  cfg = config.for_method("rapq", act_iters=iters, lr_a=lr)
  # Every walk is WALK_STEPS long, so one compiled walk serves every example: the steps
  # from ``iters`` on have learning rate 0 and leave the parameter where it is.
  steps = jnp.arange(WALK_STEPS)
  lrs = jnp.where(steps < iters, reconstruct.act_learning_rate(steps, reconstruct.budget(cfg), cfg),
                  0.0)
  bound = reconstruct.act_drift_bound(cfg)
  assert abs(float(_adam_walk(grads, lrs))) <= bound * (1 + 1e-5)
  worst = np.where(np.arange(WALK_STEPS) < iters,
                   (reconstruct.ADAM_B2 / reconstruct.ADAM_B1) ** np.arange(WALK_STEPS), 0.0)
  walked = abs(float(_adam_walk(jnp.asarray(worst, jnp.float32), lrs)))
  assert walked >= 0.99 * _last_step_bound(cfg)


def _last_step_bound(cfg):
  """The bound's share of a walk's last step alone (what the equality case attains)."""
  return (reconstruct.act_drift_bound(cfg)
          - reconstruct.act_drift_bound(dataclasses.replace(cfg, act_iters=cfg.act_iters - 1))
          if cfg.act_iters > 1 else reconstruct.act_drift_bound(cfg))


_POT, _FLOAT = fake_quant.ActSpec(4), fake_quant.ActSpec(4, pot=False)


@pytest.mark.parametrize("change, specs, start, skipped", [
    ({}, {"a": _POT, "b": _POT}, {"a": 3.0, "b": -2.0}, True),     # the default: bound 0.25
    ({"lr_a": 1e-3}, {"a": _POT}, {"a": 3.0}, False),               # bound 0.63
    ({"act_iters": 5000}, {"a": _POT}, {"a": 3.0}, False),           # the official 5000 steps
    ({"learn_bias": True}, {"a": _POT}, {"a": 3.0}, False),          # learns bias corrections
    ({}, {"a": _POT, "f": _FLOAT}, {"a": 3.0, "f": 0.2}, False),    # a float scale learns
    ({}, {"a": _POT}, {"a": 3.3}, False),                            # 0.2 from a boundary
    ({}, {"a": _POT}, {"a": 3.2}, True),                             # 0.3 from it
])
def test_activation_phase_is_skipped_only_where_it_cannot_change_the_model(
    change, specs, start, skipped):
  cfg = config.for_method("rapq", **change)
  astates = {n: {"exp": jnp.float32(e)} for n, e in start.items()}
  assert reconstruct.act_phase_moves_nothing(astates, specs, cfg) == skipped


def test_a_skipped_activation_phase_gives_the_model_of_running_it(block, monkeypatch):
  """At the default activation budget and rate (500 steps at 4e-4) a power-of-two unit
  runs no activation step; running them anyway moves every ``t`` by less than the
  drift bound and leaves every exponent and weight state as it is."""
  net, unit, params, cfg, (wspecs, aspecs), _, x_in, y_fp, start = block
  cfg = dataclasses.replace(cfg, weight_iters=6, act_iters=500)
  args = (unit, params, net.bn_targets[unit.name], start["w"], start["a"], wspecs, aspecs,
          x_in, y_fp, cfg, 2.0, jax.random.PRNGKey(3))
  skipped = reconstruct.reconstruct_unit(*args, progress=False)
  assert skipped.act_steps == 0 and skipped.history["acts"] == []
  chex.assert_trees_all_equal(skipped.astates, start["a"])
  monkeypatch.setattr(reconstruct, "act_phase_moves_nothing", lambda *_: False)
  ran = reconstruct.reconstruct_unit(*args, progress=False)
  assert ran.act_steps == 500 and ran.history["acts"][-1][0] == 500
  chex.assert_trees_all_equal(ran.wstates, skipped.wstates)
  bound = reconstruct.act_drift_bound(cfg)
  moved = []
  for point, state in ran.astates.items():
    t, exp = float(state["exp"]), float(skipped.astates[point]["exp"])
    assert round(t) == exp and abs(t - exp) <= bound, point
    moved.append(t != exp)
  assert any(moved), "the steps moved no t: the comparison shows nothing"


def test_reconstruction_raises_on_non_finite_inputs(block):
  net, unit, params, cfg, (wspecs, aspecs), _, x_in, y_fp, start = block
  bad = x_in.at[:, 0, 0, 0].set(jnp.nan)
  with pytest.raises(FloatingPointError, match=r"unit 'layer1_0'.*non-finite.*rounding phase"):
    reconstruct.reconstruct_unit(unit, params, net.bn_targets[unit.name], start["w"], start["a"],
                                 wspecs, aspecs, bad, y_fp, cfg, 2.0, jax.random.PRNGKey(3),
                                 progress=False)


def test_activation_exponent_choice_moves_to_the_best_integer():
  """Coordinate descent over integer exponents: each point walks by up to the window per
  sweep towards the loss minimum; a float-scale point and a flat loss do not move."""
  specs = {"a": fake_quant.ActSpec(4), "b": fake_quant.ActSpec(4),
           "f": fake_quant.ActSpec(4, pot=False)}
  start = {"a": {"exp": jnp.float32(0.4)}, "b": {"exp": jnp.float32(0.0)},
           "f": {"exp": jnp.float32(0.3)}}
  loss = lambda s: (s["a"]["exp"] - 3.0) ** 2 + (s["b"]["exp"] + 1.0) ** 2 + s["f"]["exp"]
  chosen, moves = reconstruct.choose_act_exponents(loss, start, specs, window=2)
  assert moves == {"a": 3, "b": -1}
  assert (float(chosen["a"]["exp"]), float(chosen["b"]["exp"])) == (3.0, -1.0)
  assert chosen["f"] is start["f"]
  _, moves = reconstruct.choose_act_exponents(lambda s: jnp.float32(1.0), start, specs, 2)
  assert moves == {"a": 0, "b": 0}


def test_reconstruction_chooses_a_better_activation_exponent(block):
  """A block whose inner activation starts two exponents too coarse: with the choice on,
  reconstruction moves that exponent down and ends with a lower unit loss than the same
  reconstruction keeping it (the gradient phase alone does not cross the integers)."""
  net, unit, params, cfg, (wspecs, aspecs), hard, x_in, y_fp, start = block
  coarse = {**start["a"], "relu1": {"exp": start["a"]["relu1"]["exp"] + 2}}
  results = {}
  for window in (0, 2):
    # At the plain lr_w the 20 rounding steps barely move the weights, so the two runs
    # differ by the activation exponent alone (scaled to 20 steps, lr_w is 1.0).
    c = dataclasses.replace(cfg, weight_iters=20, act_iters=20, act_exp_window=window,
                            lr_w_ref_iters=0)
    results[window] = reconstruct.reconstruct_unit(
        unit, params, net.bn_targets[unit.name], start["w"], coarse, wspecs, aspecs, x_in, y_fp, c,
        2.0, jax.random.PRNGKey(3), progress=False)
  assert results[0].act_moves == {}
  assert results[2].act_moves["relu1"] < 0
  loss = {w: float(objective.lp_loss(hard(params, {"w": r.wstates, "a": r.astates}, x_in),
                                     y_fp, 2.0)) for w, r in results.items()}
  assert loss[2] < 0.9 * loss[0], loss
  for state in results[2].astates.values():
    assert float(state["exp"]) == round(float(state["exp"]))


def test_activation_phase_learns_a_bias_correction(block):
  """With ``learn_bias`` the activation phase also learns a correction of each layer's
  bias: every layer's state gains a ``bias_shift`` that is not zero, and the unit's
  hard-quantized loss ends lower than the same phase without it; without ``learn_bias``
  no state holds one."""
  net, unit, params, cfg, (wspecs, aspecs), hard, x_in, y_fp, start = block
  coarse = {**start["a"], "relu1": {"exp": start["a"]["relu1"]["exp"] + 1}}
  results = {}
  for learn in (False, True):
    c = dataclasses.replace(cfg, act_iters=60, learn_bias=learn, lr_bias=1e-2)
    results[learn] = reconstruct.reconstruct_unit(
        unit, params, net.bn_targets[unit.name], start["w"], coarse, wspecs, aspecs, x_in, y_fp,
        c, 2.0, jax.random.PRNGKey(3), progress=False, weights=False)
  assert all("bias_shift" not in s for s in results[False].wstates.values())
  for role, state in results[True].wstates.items():
    chex.assert_shape(state["bias_shift"], params[role]["bias"].shape)
    assert float(jnp.max(jnp.abs(state["bias_shift"]))) > 0, role
  loss = {k: float(objective.lp_loss(hard(params, {"w": r.wstates, "a": r.astates}, x_in),
                                     y_fp, 2.0)) for k, r in results.items()}
  assert loss[True] < loss[False], loss


@pytest.mark.slow(seconds=8)
def test_act_presearch_moves_activation_exponents_that_reconstruction_starts_from(
    tiny, monkeypatch):
  """At W4A2 (the settings of the search-rounds test: the tiny net's searches move
  exponents there, and the two share compiled programs) the presearch moves activation
  exponents, lowering the KL of the network with 8-bit weights on its images; every
  unit's reconstruction starts from its activation exponents initialised on its
  quantized inputs plus the presearch's offsets."""
  net, calib, _ = tiny
  fresh, started = ptq._fresh_acts, {}

  def recording(net_, unit, specs, cfg, wstates, act_offsets, q_x, *, final_weights):
    own = fresh(net_, unit, specs, cfg, wstates, {}, q_x, final_weights=final_weights)
    out = fresh(net_, unit, specs, cfg, wstates, act_offsets, q_x, final_weights=final_weights)
    started[unit.name] = ({n: int(a["exp"]) for n, a in own.items()},
                          {n: int(a["exp"]) for n, a in out.items()})
    return out

  monkeypatch.setattr(ptq, "_fresh_acts", recording)
  result = ptq.quantize_network(net, calib, config.for_method(
      "rapq", **{**SMALL, "abits": 2, "search": "none", "act_presearch": True}), progress=False)
  summary = result.report["search"]["acts_before"]
  assert summary["moved"] and summary["after"] < summary["before"]
  assert summary["images"]["rows"] == [0, SMALL["search_samples"]]
  offsets = {}
  for move in summary["moved"]:             # 'unit/a:point+k'
    unit, point, k = re.fullmatch(r"(.+)/a:(.+?)([+-]\d+)", move).groups()
    offsets[(unit, point)] = int(k)
  assert {u for u, _ in offsets} <= set(started)
  assert set(started) == set(result.report["units"])       # every reconstructed unit
  for unit, (own, start) in started.items():
    assert start == {p: e + offsets.get((unit, p), 0) for p, e in own.items()}, unit


def test_bias_corrections_reach_the_integer_model(tiny, run):
  """The deployed model of states holding bias corrections is still power-of-two, its
  integer-only program gives the simulation's logits bit for bit, and its biases are
  the folded ones plus the corrections (which change its logits)."""
  net, _, x = tiny
  result = run("rapq")
  key = jax.random.PRNGKey(7)
  states = {u: {"w": {r: {**s, "bias_shift": 0.1 * jax.random.normal(
                    jax.random.fold_in(key, hash((u, r)) % 1000), s["exp"].shape)}
                      for r, s in st["w"].items()}, "a": st["a"]}
            for u, st in result.states.items()}
  model = quantized.from_states(net, states, result.specs, {})
  quantized.check_power_of_two(model)
  program = integer.lower(model)
  assert program.spec["checks"]["exact_float32"]
  np.testing.assert_array_equal(np.asarray(quantized.apply(model, x)),
                                np.asarray(integer.apply(program, x)))
  for unit, layers in states.items():
    for role, state in layers["w"].items():
      np.testing.assert_array_equal(model.weights[unit][role]["bias"],
                                    net.params[unit][role]["bias"] + state["bias_shift"])
  assert not np.allclose(quantized.apply(model, x), quantized.apply(result.model, x))


def test_learned_exponents_on_the_official_schedule(block):
  """The learned floor/ceil relaxation with b held at b_start in the exponent phase and
  the rounding kept across the hardening: every exponent ends an exact integer (floor or
  ceil of the Lp scale's log2), and the unit's loss falls below that of the untrained
  relaxation hardened."""
  net, unit, params, cfg, (wspecs, aspecs), hard, x_in, y_fp, _ = block
  learned = {r: fake_quant.init_weight(params[r]["kernel"], wspecs[r], learn_exponent=True)
             for r in wspecs}
  c = dataclasses.replace(cfg, weight_iters=40, learn_exponent=True, exp_warm_iters=10,
                          exp_b_hold=True, reinit_alpha_on_harden=False)
  res = reconstruct.reconstruct_unit(unit, params, net.bn_targets[unit.name], learned, {}, wspecs,
                                     {}, x_in, y_fp, c, 2.0, jax.random.PRNGKey(3),
                                     progress=False)
  for role, state in res.wstates.items():
    assert "v" not in state
    floor = np.asarray(learned[role]["exp"])
    assert set(np.unique(np.asarray(state["exp"]) - floor)) <= {0.0, 1.0}
  start = {r: fake_quant.harden_exponent(params[r]["kernel"], s, wspecs[r])
           for r, s in learned.items()}                  # the same relaxation, untrained
  before, after = (float(objective.lp_loss(unit_out(unit, params, w, wspecs, x_in), y_fp, 2.0))
                   for w in (start, res.wstates))
  assert after < before


@pytest.mark.parametrize("hold", [True, False])
def test_exponent_temperature_is_held_only_on_the_official_schedule(hold):
  cfg = config.for_method("rapq", learn_exponent=True, exp_warm_iters=50, exp_b_hold=hold,
                          b_start=20.0, b_end=2.0)
  steps = reconstruct.budget(cfg)
  values = [float(reconstruct.exponent_temperature(jnp.int32(it), steps, cfg))
            for it in (0, 10, 25, 49, 50)]
  if hold:
    assert values == [20.0] * 5
  else:
    assert values[0] == 20.0 and values[-1] == 2.0 and values == sorted(values, reverse=True)


def test_activation_learning_rate_is_optax_cosine_decay():
  cfg = config.for_method("rapq", act_iters=40, lr_a=4e-4)
  steps = reconstruct.budget(cfg)
  lr = jax.jit(reconstruct.act_learning_rate, static_argnums=2)
  got = np.array([lr(jnp.int32(it), steps, cfg) for it in range(45)])
  expected = np.array([optax.cosine_decay_schedule(4e-4, 40)(it) for it in range(45)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
  assert got[0] == np.float32(4e-4) and np.all(got[40:] == 0)


def test_compiled_steps_do_not_depend_on_the_budget(block):
  """The iteration counts reach the steps as traced values in the phase states, so runs
  at different budgets share their compiled steps (and the persistent cache's)."""
  net, unit, params, cfg, (wspecs, aspecs), _, x_in, y_fp, start = block
  xs, ys, (p, b, ws, acts) = reconstruct.place(x_in, y_fp, (params, net.bn_targets[unit.name],
                                                            start["w"], start["a"]))
  shape, n = reconstruct.structural(unit), x_in.shape[0]
  ws_t, as_t = tuple(sorted(wspecs.items())), tuple(sorted(aspecs.items()))
  key = jax.random.PRNGKey(0)
  texts = []
  for iters in ((6, 4, 2), (2000, 500, 500)):
    c = dataclasses.replace(cfg, weight_iters=iters[0], act_iters=iters[1], exp_warm_iters=iters[2])
    weights = reconstruct.weight_phase(shape, ws_t, as_t, c, 1.1, False, n)
    activations = reconstruct.act_phase(shape, ws_t, as_t, c, 1.1, n)
    state, astate = weights.init(ws), activations.init(acts, ws)
    assert int(state.steps.weight_iters) == iters[0] and int(astate.steps.act_iters) == iters[1]
    texts.append((weights.step.lower(state, acts, p, b, xs, ys, key, 3).as_text(),
                  activations.step.lower(astate, ws, p, xs, ys, key, 3).as_text()))
  assert texts[0] == texts[1]


@pytest.mark.parametrize("ref, factor", [(400, 4.0), (100, 1.0), (0, 1.0)])
def test_a_shorter_weight_stage_learns_rounding_faster(block, ref, factor):
  """Below ``lr_w_ref_iters`` weight steps, the rounding logits learn at
  ``lr_w * lr_w_ref_iters / weight_iters``: the first update of a 100-step stage is exactly
  ``factor`` times that of a 400-step one (both in the warm-up, where the budget changes
  nothing else); at or above the reference, and with it 0, ``lr_w`` applies as given."""
  net, unit, params, cfg, (wspecs, aspecs), _, x_in, y_fp, start = block
  xs, ys, (p, b, ws, acts) = reconstruct.place(x_in, y_fp, (params, net.bn_targets[unit.name],
                                                            start["w"], start["a"]))
  shape, n = reconstruct.structural(unit), x_in.shape[0]
  ws_t, as_t = tuple(sorted(wspecs.items())), tuple(sorted(aspecs.items()))
  moved = []
  for iters in (100, 400):
    c = dataclasses.replace(cfg, weight_iters=iters, lr_w_ref_iters=ref)
    weights = reconstruct.weight_phase(shape, ws_t, as_t, c, 2.0, False, n)
    state = weights.init(ws)
    after, _ = weights.step(state, acts, p, b, xs, ys, jax.random.PRNGKey(0), 0)
    moved.append(jax.tree.map(lambda a, b: np.asarray(a - b), after.train, state.train))
  for role in moved[0]:
    short, long = moved[0][role]["alpha"], moved[1][role]["alpha"]
    assert np.any(long != 0)
    np.testing.assert_allclose(short, factor * long, rtol=1e-5, atol=1e-6)  # ulp of alpha


def unit_out(unit, params, wstates, wspecs, x):
  """The unit's output with hard weights and float activations."""
  wq, aq = fake_quant.hooks(wstates, {}, wspecs, {}, soft=False, acts_on=False)
  return unit_apply(unit, params, x, wq, aq)[0]


def test_weight_exponent_choice_takes_each_channels_least_error():
  """Per channel the offset with the least error, a strict improvement on 0 needed (ties
  stay); layers in order, each scored with the choices made before it; a float-scale
  layer does not move."""
  unit = Unit("stub", "conv", tuple(Layer(r, r) for r in ("a", "b", "f")), ())
  specs = {"a": fake_quant.WeightSpec(4), "b": fake_quant.WeightSpec(4),
           "f": fake_quant.WeightSpec(4, pot=False)}
  params = {r: {"kernel": jnp.ones((1, 1, 1, 3)), "bias": jnp.zeros(3)} for r in specs}
  states = {r: {"exp": jnp.zeros(3), "lo": jnp.zeros(3)} for r in specs}
  seen = []

  def errors_for(role, ws):
    seen.append((role, np.asarray(ws["a"]["exp"]).tolist()))
    # rows: offsets -1, 0, +1; columns: channels
    return {"a": jnp.asarray([[0.5, 2.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.1, 1.0]]),
            "b": jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.9]])}[role]

  chosen, moved = reconstruct.choose_weight_exponents(unit, errors_for, params, states,
                                                      specs, window=1)
  np.testing.assert_array_equal(chosen["a"]["exp"], [-1.0, 1.0, 0.0])
  np.testing.assert_array_equal(chosen["b"]["exp"], [0.0, 0.0, 1.0])
  assert chosen["f"] is states["f"]
  assert moved == {"a": 2, "b": 1}
  assert seen == [("a", [0.0, 0.0, 0.0]), ("b", [-1.0, 1.0, 0.0])]


def test_reconstruction_moves_weight_exponents_to_a_better_grid(block):
  """A block whose first conv starts two exponents too coarse in every channel: with
  the weight exponent choice on, reconstruction moves channels to finer grids part-way
  through and ends with a lower unit loss than the same reconstruction keeping them;
  every exponent stays an exact integer."""
  net, unit, params, cfg, (wspecs, aspecs), hard, x_in, y_fp, start = block
  coarse = {**start["w"], "conv1": fake_quant.move_exponents(
      params["conv1"]["kernel"], start["w"]["conv1"], wspecs["conv1"],
      jnp.full(start["w"]["conv1"]["exp"].shape, 2, jnp.int32))}
  results = {}
  for window in (0, 2):
    c = dataclasses.replace(cfg, weight_iters=40, weight_exp_window=window, weight_exp_at=0.5)
    results[window] = reconstruct.reconstruct_unit(
        unit, params, net.bn_targets[unit.name], coarse, start["a"], wspecs, aspecs, x_in, y_fp, c,
        2.0, jax.random.PRNGKey(3), progress=False)
  assert results[0].weight_moves == {}
  assert results[2].weight_moves["conv1"] > 0
  assert set(results[2].weight_moves) == {"conv1", "conv2"}
  finer = np.asarray(results[2].wstates["conv1"]["exp"]) < np.asarray(coarse["conv1"]["exp"])
  assert finer.sum() == results[2].weight_moves["conv1"]    # every move is to a finer grid
  loss = {w: float(objective.lp_loss(hard(params, {"w": r.wstates, "a": start["a"]}, x_in),
                                     y_fp, 2.0)) for w, r in results.items()}
  assert loss[2] < 0.9 * loss[0], loss
  for state in results[2].wstates.values():
    np.testing.assert_array_equal(state["exp"], np.round(state["exp"]))


def test_nan_calibration_is_rejected(tiny):
  """Non-finite calibration images never reach reconstruction: quantize_network
  rejects them up front."""
  net, calib, _ = tiny
  bad = calib.at[3, 2, 1, 0].set(jnp.nan)
  for method in ("naive", "rapq"):
    with pytest.raises(ValueError, match=r"image 3 has a non-finite value nan at pixel "
                                         r"\(h=2, w=1, c=0\)"):
      ptq.quantize_network(net, bad, config.for_method(method, **SMALL), progress=False)


def test_too_few_calibration_images(tiny):
  net, calib, _ = tiny
  with pytest.raises(ValueError, match="batch size 8"):
    ptq.quantize_network(net, calib[:4], config.for_method("brecq_pot", **SMALL), progress=False)
  with pytest.raises(ValueError, match=r"search_samples = 60 held out of 64 calibration images "
                                       r"leaves 4 to fit the quantizers, fewer than 8"):
    ptq.quantize_network(net, calib, config.for_method(
        "rapq", **{**SMALL, "search": "after", "search_samples": 60}), progress=False)


@pytest.mark.parametrize("overrides, fit, scored", [
    (dict(search="after", search_samples=16), (0, 48), (48, 64)),
    (dict(search="after", search_samples=16, search_holdout=False), (0, 64), (0, 16)),
    (dict(search="after", search_samples=100, search_holdout=False), (0, 64), (0, 64)),
    (dict(search_samples=16), (0, 64), (0, 0)),
])
def test_calibration_split(overrides, fit, scored):
  """Rows fitted and rows the search scores: held out (the default of a search), shared
  with reconstruction (search_holdout=False), or none without a search (rapq's
  default: reconstruction fits every calibration image)."""
  split = ptq.calibration_split(64, config.for_method("rapq", **overrides))
  assert [(s.start, s.stop) for s in split] == [fit, scored]


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("method, expected", [
    ("naive", dict(pot_scales=True, reconstruct=False, runs_exponent_relaxation=False,
                   search="none")),
    ("brecq", dict(pot_scales=False, reconstruct=True, runs_exponent_relaxation=False,
                   search="none")),
    ("brecq_pot", dict(pot_scales=True, reconstruct=True, runs_exponent_relaxation=False,
                       search="none")),
    ("rapq", dict(pot_scales=True, reconstruct=True, runs_exponent_relaxation=False,
                  exp_init="lp", search="none", loss_p_source="bn")),
])
def test_method_presets(method, expected):
  cfg = config.for_method(method)
  for field, value in expected.items():
    assert getattr(cfg, field) == value
  hash(cfg)                                        # static under jit / lru_cache
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.wbits = 3


@pytest.mark.parametrize("make, field, value", [
    (lambda: config.for_method("bogus"), "method", "'bogus'"),
    (lambda: config.for_method("rapq", wbits=9), "wbits", "9"),
    (lambda: config.for_method("rapq", abits=1), "abits", "1"),
    (lambda: config.for_method("rapq", first_last_bits=4.0), "first_last_bits", "4.0"),
    (lambda: config.for_method("rapq", weight_iters=-1), "weight_iters", "-1"),
    (lambda: config.for_method("rapq", act_iters=2.5), "act_iters", "2.5"),
    (lambda: config.for_method("rapq", batch_size=0), "batch_size", "0"),
    (lambda: config.for_method("rapq", search="x"), "search", "'x'"),
    (lambda: config.for_method("rapq", search_objective="l1"), "search_objective", "'l1'"),
    (lambda: config.for_method("rapq", search_reach=0), "search_reach", "0"),
    (lambda: config.for_method("rapq", search_rounds=0), "search_rounds", "0"),
    (lambda: config.for_method("rapq", search_rounds=2, search="before"), "search_rounds", "2"),
    (lambda: config.for_method("rapq", search_rounds=2, protocol="official"), "search_rounds",
     "protocol 'strict'"),
    (lambda: config.for_method("rapq", search_holdout=1), "search_holdout", "1"),
    (lambda: config.for_method("rapq", search_confidence=-0.5), "search_confidence", "-0.5"),
    (lambda: config.for_method("rapq", search_confidence=2.0, search_samples=1),
     "search_confidence", "search_samples >= 2"),
    (lambda: config.for_method("brecq_pot", pot_parts="w"), "pot_parts", "'w'"),
    (lambda: config.for_method("rapq", act_exp_init="grid"), "act_exp_init", "'grid'"),
    (lambda: config.for_method("rapq", pot_parts="acts", search="after"), "pot_parts",
     "search='none'"),
    (lambda: config.for_method("brecq", pot_parts="acts"), "pot_parts", "pot_scales=True"),
    (lambda: config.for_method("rapq", loss_p_source="gamma"), "loss_p_source", "'gamma'"),
    (lambda: config.for_method("naive", learn_bias=True), "learn_bias", "reconstruct=True"),
    (lambda: config.for_method("rapq", learn_bias=1), "learn_bias", "1"),
    (lambda: config.for_method("rapq", lr_bias=0.0), "lr_bias", "0.0"),
    (lambda: config.for_method("rapq", act_presearch="yes"), "act_presearch", "'yes'"),
    (lambda: config.for_method("naive", act_presearch=True), "act_presearch", "reconstruct=True"),
    (lambda: config.for_method("rapq", act_presearch=True, search="both"), "act_presearch",
     "search 'none' or 'after'"),
    (lambda: config.for_method("rapq", learn_exponent=True, weight_iters=100, exp_warm_iters=101),
     "exp_warm_iters", "101"),
    (lambda: config.for_method("brecq", search="after"), "search", "none"),
    (lambda: config.for_method("rapq", iters_w=10), "iters_w", "now called weight_iters"),
    (lambda: config.for_method("rapq", lp_coef=0.5), "lp_coef", "now called loss_p_coef"),
    (lambda: config.for_method("rapq", init_p=2.0), "init_p", "now called scale_p"),
])
def test_config_validation(make, field, value):
  with pytest.raises(ValueError) as err:
    make()
  assert field in str(err.value) and value in str(err.value)


def test_weight_exponent_choice_needs_fixed_power_of_two_exponents():
  for kw in (dict(learn_exponent=True),
             dict(pot_scales=False, search="none", align_scales="none")):
    with pytest.raises(ValueError, match=r"weight_exp_window = 1 moves fixed power-of-two "
                                         r"exponents: it needs pot_scales=True and "
                                         r"learn_exponent=False"):
      config.for_method("rapq", weight_exp_window=1, **kw)
  with pytest.raises(ValueError, match=r"weight_exp_at = 1.5: expected a finite number >= 0 "
                                       r"and <= 1"):
    config.for_method("rapq", weight_exp_window=1, weight_exp_at=1.5)


def test_exp_warm_iters_may_exceed_weight_iters_without_exponent_learning():
  config.for_method("brecq_pot", weight_iters=10, exp_warm_iters=500)
  config.for_method("naive", weight_iters=10, exp_warm_iters=500)
