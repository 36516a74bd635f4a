"""The PTQ pipeline over a folded network: initialise quantizers, optionally search the
integer exponents network-wide, reconstruct unit by unit, and return the result.

Unit inputs during reconstruction come from the already-quantized network and targets
from the FP network (BRECQ's setting); both are cached once per unit and pass. Which
units are reconstructed, in which passes and on which inputs is ``cfg.protocol``
(``PTQConfig``): 'strict' makes one pass (each unit's weights, then its activations),
'official' two (every unit's weights, then every unit's activations) and leaves the
stem at round to nearest.
"""
import dataclasses
import functools
import logging
import time
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rapq_jax import (align, fake_quant, integrity, objective, parallel, quantized, resume,
                      rounding, search)
from rapq_jax.config import PTQConfig, current_names
from rapq_jax.fake_quant import hooks
from rapq_jax.network import Network, identity_hook, network_apply, unit_apply
from rapq_jax.reconstruct import reconstruct_unit, structural
from rapq_jax.units import Unit

INIT_SAMPLES = 256
FORWARD_BATCH = 256


class PTQResult(NamedTuple):
  """apply: jitted fake-quant inference ``x -> logits``; model: the integer
  ``QuantizedModel`` (None for float scales); states/specs: final quantizer states;
  report: per-unit seconds, Lp exponents, loss curves, search results; network: the
  network the states quantize, the given one as ``align_scales`` rescaled it (same FP
  function)."""
  apply: Callable
  model: quantized.QuantizedModel | None
  states: dict
  specs: dict
  report: dict
  network: Network


def unit_specs(net: Network, cfg: PTQConfig) -> dict:
  """``{unit: (wspecs, aspecs)}``: first and last weight layers, the network input and
  the activation feeding the classifier at ``first_last_bits`` (under the 'official'
  protocol also the stem's output); the rest at ``wbits`` / ``abits``."""
  first, head = net.units[0].name, net.units[-1].name
  feeder = net.units[-2].name
  eight_bit_outputs = {feeder} | ({first} if cfg.protocol == "official" else set())
  specs = {}
  for unit in net.units:
    wb = cfg.first_last_bits if unit.name in (first, head) else cfg.wbits
    wspecs = {l.role: fake_quant.WeightSpec(wb, pot=_pot_scale(cfg, None),
                                            signed=cfg.weight_signed)
              for l in unit.layers}
    aspecs = {}
    for a in unit.acts:
      ab = cfg.first_last_bits if (a.name == "input" or (
          unit.name in eight_bit_outputs and a.name == "out")) else cfg.abits
      aspecs[a.name] = fake_quant.ActSpec(ab, signed=a.signed, pot=_pot_scale(cfg, a.name))
    specs[unit.name] = (wspecs, aspecs)
  return specs


def _pot_scale(cfg: PTQConfig, point: str | None) -> bool:
  """Whether a weight quantizer (``point`` None) or the activation quantizer at ``point``
  has a power-of-two scale under ``cfg.pot_scales`` and ``cfg.pot_parts``."""
  if not cfg.pot_scales:
    return False
  if point is None:
    return cfg.pot_parts in ("both", "weights")
  return {"both": True, "weights": False, "acts": True, "outputs": point == "out",
          "inner": point != "out"}[cfg.pot_parts]


def unit_lp(net: Network, unit_name: str, cfg: PTQConfig, *, rounded: bool = True) -> float:
  """Lp exponent of a unit's reconstruction loss: BN-derived (``cfg.loss_p_source='bn'``,
  rounded to ``cfg.loss_p_digits``, or not with ``rounded=False``: the ``p_unrounded`` of
  the reports) or ``cfg.loss_p_fixed`` (``loss_p_source='fixed'``, units without BN, and under
  the 'official' protocol the stem and the classifier, as the official driver's p = 2)."""
  unit = next(u for u in net.units if u.name == unit_name)
  role = unit.last_bn_layer
  edge = cfg.protocol == "official" and unit_name in (net.units[0].name, net.units[-1].name)
  if cfg.loss_p_source == "fixed" or edge or role is None or role not in net.bn_targets[unit_name]:
    return cfg.loss_p_fixed
  return objective.bn_lp_exponent(net.bn_targets[unit_name][role]["gamma"], coef=cfg.loss_p_coef,
                                  digits=cfg.loss_p_digits if rounded else None,
                                  default=cfg.loss_p_fixed)


def calibration_network(net: Network, cfg: PTQConfig) -> Network:
  """The network calibration sees: ``net``, or under the 'official' protocol ``net``
  without its input quantizer (the first unit's ``'input'`` point; the official driver
  never quantizes the network input)."""
  first = net.units[0]
  if cfg.protocol != "official" or not any(a.name == "input" for a in first.acts):
    return net
  stem = dataclasses.replace(first, acts=tuple(a for a in first.acts if a.name != "input"))
  return Network((stem,) + net.units[1:], net.params, net.bn_targets)


def frozen_units(net: Network, cfg: PTQConfig) -> tuple[str, ...]:
  """Units never reconstructed (their weights round to nearest, their activation
  exponents stay at their initial values): the stem under the 'official' protocol."""
  return (net.units[0].name,) if cfg.protocol == "official" and cfg.reconstruct else ()


def reconstruction_passes(cfg: PTQConfig) -> tuple[tuple[str, ...], ...]:
  """The stages of each pass over the units: 'strict' one pass, each unit's weights then
  its activations; 'official' every unit's weights, then every unit's activations."""
  return (("weights", "acts"),) if cfg.protocol == "strict" else (("weights",), ("acts",))


def _batched(fn, x, batch: int = FORWARD_BATCH):
  """Row-wise ``fn`` over x [N, ...] in batches, each split over all devices."""
  return parallel.map_rows(fn, x, batch)


class UnitFns(NamedTuple):
  """Jitted functions of one unit shape (``unit_fns``)."""
  init: Callable
  init_weights: Callable
  init_acts: Callable
  hard: Callable
  fp: Callable


@functools.lru_cache(maxsize=None)
def _shape_fns(unit: Unit, wspecs: tuple, aspecs: tuple, cfg: PTQConfig):
  """Jitted per-unit functions, shared by equally shaped units (see ``structural``):
  init(params, x) -> (wstates, astates); init_weights(params) -> the same wstates alone;
  init_acts(params, wstates, x) -> astates on the hard weights ``wstates``;
  hard(params, state, x, acts_on=True) -> quantized output (``acts_on=False``: weights
  only); fp(params, x) -> FP output."""
  wspecs, aspecs = dict(wspecs), dict(aspecs)

  def act_states(params, wstates, x, soft):
    # Activation states computed in order on ``x`` (each point sees the points before it
    # already quantized).
    astates = {}

    def aq(name, h):
      astates[name] = fake_quant.init_act(h, aspecs[name], p=cfg.scale_p,
                                          exponent_choice=cfg.act_exp_init)
      return fake_quant.act_fake_quant(h, astates[name], aspecs[name])

    wq, _ = hooks(wstates, {}, wspecs, aspecs, soft=soft, acts_on=False)
    unit_apply(unit, params, x, wq, aq)
    return astates

  def weight_states(params):
    return {l.role: fake_quant.init_weight(
        params[l.role]["kernel"], wspecs[l.role], learn_exponent=cfg.runs_exponent_relaxation,
        learn_rounding=cfg.reconstruct, p=cfg.scale_p, exponent_choice=cfg.exp_init)
        for l in unit.layers}

  @jax.jit
  def init(params, x):
    # Lp-initialised weights, then activation states with those weights (soft).
    wstates = weight_states(params)
    return wstates, act_states(params, wstates, x, True)

  @jax.jit
  def init_acts(params, wstates, x):
    return act_states(params, wstates, x, False)

  @functools.partial(jax.jit, static_argnames="acts_on")
  def hard(params, state, x, acts_on=True):
    wq, aq = hooks(state["w"], state["a"], wspecs, aspecs, soft=False, acts_on=acts_on)
    return unit_apply(unit, params, x, wq, aq)[0]

  @jax.jit
  def fp(params, x):
    return unit_apply(unit, params, x, identity_hook, identity_hook)[0]

  return UnitFns(init, jax.jit(weight_states), init_acts, hard, fp)


def unit_fns(unit: Unit, specs: dict, cfg: PTQConfig) -> UnitFns:
  """The jitted functions of ``unit`` under ``specs`` (``unit_specs``) and ``cfg``."""
  wspecs, aspecs = specs[unit.name]
  return _shape_fns(structural(unit), tuple(sorted(wspecs.items())),
                   tuple(sorted(aspecs.items())), cfg)


def _init_all(net, specs, x, cfg, *, acts: bool = True):
  """Initial states of every unit: Lp-initialised weights and activation states along
  the round-to-nearest quantized flow of ``x``. Without ``acts`` the weights only, each
  unit's ``a`` empty: reconstruction initialises every unit's activations afresh on its
  own quantized inputs (``_fresh_acts``), so where nothing else reads them (no search
  before it) computing them here would be thrown away."""
  states = {}
  for unit in net.units:
    fns = unit_fns(unit, specs, cfg)
    if not acts:
      states[unit.name] = {"w": fns.init_weights(net.params[unit.name]), "a": {}}
      continue
    w, a = fns.init(net.params[unit.name], x)
    states[unit.name] = {"w": w, "a": a}
    x = fns.hard(net.params[unit.name], states[unit.name], x)
  return states


def _run_search(net, states, specs, x, fp_logits, cfg, *, weights: bool, when: str,
                images: dict, progress: bool):
  """Runs the search; returns its result and a JSON-able summary (``images``: which
  calibration rows it scored). A search stopped at its sweep limit while still moving
  exponents logs one warning. With ``progress`` one line says that it starts (it is one
  compiled loop, silent for minutes on a deep network) and one what it did."""
  t0 = time.perf_counter()
  if progress:
    tqdm.write(f"  exponent search {when}: {x.shape[0]} images, at most "
               f"{cfg.search_sweeps} sweeps ...")
  # The first/last-layer quantizers (first_last_bits) keep their exponents: on the shared
  # ResNet-20 W2A4 the search's one move there (the classifier input) cost 1.0 top-1
  # point while its moves on low-bit quantizers gained.
  res = search.search_exponents(net, states, specs, x, fp_logits, weights=weights, acts=True,
                                kind=cfg.search_objective, max_sweeps=cfg.search_sweeps,
                                reach=cfg.search_reach, below_bits=cfg.first_last_bits,
                                folds=cfg.search_folds, confidence=cfg.search_confidence)
  moved = [f"{u}/{k}:{n}{int(o):+d}" for (u, k, n), o in zip(res.names, np.asarray(res.offsets))
           if o]
  if res.capped:
    logging.warning("exponent search %s stopped at search_sweeps = %d with "
                    "exponents still moving (%d moved)", when, cfg.search_sweeps, len(moved))
  info = dict(before=res.before, after=res.after, sweeps=res.sweeps, capped=res.capped,
              evaluations=res.evaluations,
              moved=moved, images=images, seconds=time.perf_counter() - t0)
  if progress:
    tqdm.write(f"  exponent search {when}: {cfg.search_objective} {res.before:.4g} -> "
               f"{res.after:.4g}, {len(moved)} moved, {info['seconds']:.0f} s")
  return res, info


def _rounded(states: dict) -> dict:
  """Round-to-nearest view of quantizer states: no AdaRound logits, soft exponents
  rounded (``e0 + (v >= 0)``), as the search before reconstruction evaluates them and
  as units never reconstructed (``frozen_units``) keep them."""
  out = {}
  for u, st in states.items():
    w = {}
    for r, s in st["w"].items():
      w[r] = {"lo": s["lo"], "exp": s["exp"] + (rounding.hard_choice(s["v"]) if "v" in s else 0.0)}
    out[u] = {"w": w, "a": st["a"]}
  return out


def _shift_weights(net, states, specs, offsets: dict) -> dict:
  """Moves each weight layer's exponents by ``offsets[(unit, 'w', role)]`` and restarts
  its rounding logits on the new grid."""
  out = {}
  for u, st in states.items():
    w = {}
    for r, s in st["w"].items():
      off = float(offsets.get((u, "w", r), 0))
      w[r] = s if not off else fake_quant.reset_rounding(
          net.params[u][r]["kernel"], {**s, "exp": s["exp"] + off}, specs[u][0][r])
    out[u] = {"w": w, "a": st["a"]}
  return out


def _load(store: resume.Store | None, name: str):
  """``store.load(name)`` (unit states under the field names now), or None without a
  store or for a damaged entry (reported: it is computed again and replaced, never
  used)."""
  if store is None:
    return None
  try:
    loaded = store.load(name)
  except integrity.IntegrityError as err:
    warnings.warn(f"{err}; computing {name} again", RuntimeWarning, stacklevel=3)
    return None
  if loaded is None or loaded[1] is None:
    return loaded
  return loaded[0], fake_quant.current_state_names(loaded[1])


def _stored(store: resume.Store | None, name: str, compute: Callable):
  """``(states, report entry, loaded)`` of the unit stage stored as ``name``: loaded
  from ``store``, else ``compute() -> (states, entry)``, saved there."""
  loaded = _load(store, name)
  if loaded is not None:
    entry, states = loaded
    entry["history"] = {ph: [tuple(s) for s in v] for ph, v in entry["history"].items()}
    return states, entry, True
  states, entry = compute()
  if store is not None:
    store.save(name, entry, states)
  return states, entry, False


def _stored_offsets(store: resume.Store | None, name: str, compute: Callable):
  """``compute()``'s exponent offsets ``{name tuple: int}`` and search summary, or those
  ``store`` holds under ``name`` from an earlier call (saved there once computed)."""
  loaded = _load(store, name)
  if loaded is not None:
    info, _ = loaded
    return {tuple(n): o for n, o in info["offsets"]}, info["summary"]
  offsets, summary = compute()
  if store is not None:
    store.save(name, {"offsets": [[list(n), o] for n, o in offsets.items()],
                      "summary": summary})
  return offsets, summary


def _search_before(net, states, specs, x, fp_logits, cfg, store, images, progress):
  """The search before reconstruction, or its stored outcome: offsets
  ``{(unit, 'w'|'a', name): int}`` and the JSON-able summary."""
  def compute():
    res, summary = _run_search(net, _rounded(states), specs, x, fp_logits, cfg, weights=True,
                               when="before reconstruction", images=images, progress=progress)
    return dict(zip(res.names, np.asarray(res.offsets).tolist())), summary

  return _stored_offsets(store, "search_before", compute)


def _act_presearch(net, cfg, fit, store, progress):
  """The offsets ``{(unit, point): int}`` of ``PTQConfig.act_presearch`` (or its stored
  outcome) and the JSON-able summary of its search."""
  def compute():
    near = dataclasses.replace(cfg, wbits=cfg.first_last_bits, learn_exponent=False)
    specs = unit_specs(net, near)
    rows = min(cfg.search_samples, fit.shape[0]) // cfg.search_folds * cfg.search_folds
    x = fit[:rows]
    states = _rounded(_init_all(net, specs, fit[:INIT_SAMPLES], near))
    res, summary = _run_search(
        net, states, specs, x, jax.jit(network_apply)(net, x), cfg, weights=False,
        when="of activations before reconstruction", progress=progress,
        images=dict(rows=[0, rows], reconstruction_rows=[0, fit.shape[0]], held_out=False))
    return {(u, n): o for (u, _, n), o in zip(res.names, np.asarray(res.offsets).tolist())}, summary

  return _stored_offsets(store, "act_presearch", compute)


def _fresh_acts(net, unit, specs, cfg, wstates, act_offsets, q_x, *, final_weights: bool):
  """Activation states of ``unit`` initialised on its quantized inputs ``q_x``, with its
  initial (soft) weights, or with the hard ``wstates`` where they are ``final_weights``,
  plus the search's ``act_offsets``."""
  params, fns = net.params[unit.name], unit_fns(unit, specs, cfg)
  x = q_x[:INIT_SAMPLES]
  astates = fns.init_acts(params, wstates, x) if final_weights else fns.init(params, x)[1]
  return {n: {"exp": a["exp"] + act_offsets.get((unit.name, n), 0)} for n, a in astates.items()}


def _reconstruct(net, unit, specs, wstates, act_offsets, q_x, fp_y, cfg, key, progress,
                 stages, astates=None):
  """Reconstructs the ``stages`` ('weights', 'acts') of one unit from its weight states
  and its activation states ``astates`` (by default fresh ones on the quantized inputs
  ``q_x``, plus ``act_offsets``); returns its states and report entry (seconds, p and
  its unrounded value, history, activation and weight exponent moves, activation steps
  run)."""
  params, (wspecs, aspecs) = net.params[unit.name], specs[unit.name]
  if astates is None:
    astates = _fresh_acts(net, unit, specs, cfg, wstates, act_offsets, q_x,
                          final_weights="weights" not in stages)
  p = unit_lp(net, unit.name, cfg)
  res = reconstruct_unit(unit, params, net.bn_targets[unit.name], wstates, astates, wspecs, aspecs,
                         q_x, fp_y, cfg, p, key, progress=progress,
                         weights="weights" in stages, acts="acts" in stages)
  return {"w": res.wstates, "a": res.astates}, {
      "seconds": res.seconds, "p": p, "p_unrounded": unit_lp(net, unit.name, cfg, rounded=False),
      "history": res.history, "act_moves": res.act_moves, "weight_moves": res.weight_moves,
      "act_steps": res.act_steps}


def _joined(entry: dict | None, later: dict) -> dict:
  """One report entry for a unit reconstructed in two passes: seconds added, loss
  curves and activation moves of both."""
  if entry is None:
    return later
  return {**later, "seconds": entry["seconds"] + later["seconds"],
          "history": {k: list(entry["history"][k]) + list(later["history"][k])
                      for k in later["history"]},
          "act_moves": {**entry["act_moves"], **later["act_moves"]},
          "weight_moves": {**entry.get("weight_moves", {}), **later["weight_moves"]}}


def _print_unit(label: str, entry: dict, phase: str, loaded: bool) -> None:
  """One line per finished unit: seconds, p, final loss of ``phase``, exponent moves."""
  losses = entry["history"][phase]
  tqdm.write(f"  {label:>14}: {entry['seconds']:6.1f} s  p={entry['p']:g}"
             + (f"  final loss {losses[-1][1]:.4g}" if losses else "")
             + "".join(f"  {a} {m:+d}" for a, m in entry["act_moves"].items() if m)
             + "".join(f"  {r} {m} ch moved" for r, m in entry.get("weight_moves", {}).items()
                       if m)
             + ("  (loaded)" if loaded else ""))


def _unit_inputs(net, specs, cfg, states: dict, calib, *, acts_on: bool = True):
  """Walks the units in order, yielding ``(i, unit, q_x, fp_y)``: the unit's inputs from
  the network quantized so far and its FP outputs. Before resuming, the caller puts the
  unit's final states in ``states`` (the dict it passed, read after each yield), which
  quantize the inputs of the next unit (with activations when ``acts_on``)."""
  fp_x, q_x = calib, calib
  for i, unit in enumerate(net.units):
    params, fns = net.params[unit.name], unit_fns(unit, specs, cfg)
    fp_y = _batched(functools.partial(fns.fp, params), fp_x)
    yield i, unit, q_x, fp_y
    q_x = _batched(functools.partial(fns.hard, params, states[unit.name], acts_on=acts_on),
                   q_x)
    fp_x = fp_y


def _reconstruct_all(net, specs, states, act_offsets, calib, cfg, key, store, report,
                     progress):
  """Runs the protocol's passes over the units (``reconstruction_passes``); returns the
  states and fills ``report['units']`` and ``report['protocol']['order']``. A unit's
  stage in the last pass is stored as ``unit_<name>``, in the 'official' weight pass as
  ``weights_<name>``; on resume both are loaded instead of computed, so a run killed in
  either pass continues where it stopped."""
  passes = reconstruction_passes(cfg)
  frozen = frozen_units(net, cfg)
  states = dict(states)
  for k, stages in enumerate(passes):
    acts_on = "acts" in stages
    for i, unit, q_x, fp_y in _unit_inputs(net, specs, cfg, states, calib, acts_on=acts_on):
      # The stages this unit has in this pass (none for a frozen unit; a unit without
      # activation quantizers, the classifier, has no activation stage).
      todo = () if unit.name in frozen else tuple(
          s for s in stages if s == "weights" or specs[unit.name][1])
      if unit.name in frozen and acts_on:
        states[unit.name] = {"w": states[unit.name]["w"], "a": _fresh_acts(
            net, unit, specs, cfg, states[unit.name]["w"], act_offsets, q_x,
            final_weights=True)}
      if todo:
        def compute():
          st, entry = _reconstruct(net, unit, specs, states[unit.name]["w"], act_offsets, q_x,
                                   fp_y, cfg, jax.random.fold_in(key, i), progress, todo)
          return st, _joined(report["units"].get(unit.name), entry)

        states[unit.name], entry, loaded = _stored(
            store, f"unit_{unit.name}" if k == len(passes) - 1 else f"{stages[0]}_{unit.name}",
            compute)
        report["units"][unit.name] = entry
        report["protocol"]["order"].append([unit.name, "+".join(todo)])
        if progress:
          _print_unit(unit.name + ("" if len(passes) == 1 else " " + stages[0]), entry,
                      "weights" if "weights" in todo else "acts", loaded)
  return states


def _rereconstruct(net, specs, states, moved: set, calib, cfg, key, store, report, progress,
                   round_: int) -> tuple[dict, list]:
  """Round ``round_`` (2, 3, ...) of ``search_rounds``: the weight stage again of every
  unit whose weight-stage inputs the search changed (every unit after the first one in
  ``moved``) or whose own moved quantizers that stage sees (``weight_phase_act_quant >
  0``), its rounding restarted on its grid, on inputs from the network as it now is;
  activation exponents stay where the search put them. Returns the states and the units
  redone. Each is stored as ``round<r>_<name>`` and loaded on resume."""
  frozen = frozen_units(net, cfg)
  first = min(i for i, u in enumerate(net.units) if u.name in moved)
  states, redone = dict(states), []
  for i, unit, q_x, fp_y in _unit_inputs(net, specs, cfg, states, calib):
    if unit.name not in frozen and (i > first or (
        unit.name in moved and cfg.weight_phase_act_quant > 0)):
      def compute():
        params, wspecs = net.params[unit.name], specs[unit.name][0]
        wstates = {r: fake_quant.reset_rounding(params[r]["kernel"], s, wspecs[r])
                   for r, s in states[unit.name]["w"].items()}
        st, entry = _reconstruct(
            net, unit, specs, wstates, {}, q_x, fp_y, cfg,
            jax.random.fold_in(jax.random.fold_in(key, i), round_), progress, ("weights",),
            astates=states[unit.name]["a"])
        earlier = report["units"][unit.name]
        # The loss curve goes on after the earlier rounds' steps.
        last = earlier["history"]["weights"][-1][0] if earlier["history"]["weights"] else 0
        entry["history"]["weights"] = [(it + last, v) for it, v in entry["history"]["weights"]]
        return st, _joined(earlier, entry)

      states[unit.name], entry, loaded = _stored(store, f"round{round_}_{unit.name}", compute)
      report["units"][unit.name] = entry
      report["protocol"]["order"].append([unit.name, f"weights (round {round_})"])
      redone.append(unit.name)
      if progress:
        _print_unit(f"{unit.name} r{round_}", entry, "weights", loaded)
  return states, redone


def _search_after(net, specs, states, fit, sub, fp_logits, cfg, key, store, report, progress,
                  images) -> dict:
  """The search after reconstruction (activations only once weights are reconstructed,
  since AdaRound has learned a rounding for each grid), alternated with
  ``_rereconstruct`` for ``search_rounds`` rounds or until a search moves nothing.
  Returns the states of the round whose search ended with the least objective on the
  held-out images (its summary says ``kept``; ``report['units']`` is that round's), as
  a later round may end worse than an earlier one. Summaries: ``report['search']
  ['after']``, then ``['round_<r>']`` with the units ``rereconstructed``."""
  best, ran = None, []     # best: (objective, states, unit entries, round)
  for round_ in range(1, cfg.search_rounds + 1):
    redone = []
    if round_ > 1:
      moved = {u for (u, _, _), o in zip(res.names, np.asarray(res.offsets)) if o}
      if not moved:
        break
      # search_rounds > 1 runs under the 'strict' protocol only (PTQConfig), where
      # calibration and the returned model use one network.
      states, redone = _rereconstruct(net, specs, states, moved, fit, cfg, key, store,
                                      report, progress, round_)
    res, info = _run_search(net, states, specs, sub, fp_logits, cfg,
                            weights=not cfg.reconstruct, images=images,
                            when="after reconstruction" if round_ == 1 else
                            f"after re-reconstruction round {round_}", progress=progress)
    states = res.states
    report["search"][_round_name(round_)] = (
        info if round_ == 1 else {**info, "rereconstructed": redone})
    ran.append(round_)
    if best is None or res.after < best[0]:
      best = (res.after, states, dict(report["units"]), round_)
  if cfg.search_rounds > 1:
    for r in ran:
      report["search"][_round_name(r)]["kept"] = r == best[3]
    if progress and best[3] != ran[-1]:
      tqdm.write(f"  search rounds: kept round {best[3]} (KL {best[0]:.4g}), the least on the "
                 "held-out images")
  report["units"] = best[2]
  return best[1]


def _round_name(round_: int) -> str:
  """The ``report['search']`` key of a round of the search after reconstruction."""
  return "after" if round_ == 1 else f"round_{round_}"


def _with_input_quantizer(net, states, specs, calib, cfg):
  """``states`` plus the network input's quantizer where calibration ran without one
  (the 'official' protocol): initialised on the calibration images like any activation
  quantizer (``fake_quant.init_act``), never learned."""
  first = net.units[0].name
  spec = specs[first][1].get("input")
  if spec is None or "input" in states[first]["a"]:
    return states
  init = jax.jit(functools.partial(fake_quant.init_act, spec=spec, p=cfg.scale_p,
                                   exponent_choice=cfg.act_exp_init))
  return {**states, first: {"w": states[first]["w"],
                            "a": {"input": init(calib[:INIT_SAMPLES]), **states[first]["a"]}}}


def input_channels(net: Network) -> int:
  """Channels of the images the network takes (its first layer's input channels)."""
  first = net.units[0].layers[0]
  return net.params[net.units[0].name][first.role]["kernel"].shape[-2] * first.groups


def calibration_split(n: int, cfg: PTQConfig) -> tuple[slice, slice]:
  """(rows the quantizers are initialised and reconstructed on, rows the search scores)
  of ``n`` calibration images. With ``search_holdout`` the last ``search_samples`` rows
  are the search's alone; without it the search scores the first ``search_samples``,
  which reconstruction also uses; without a search every row is fitted."""
  if cfg.search == "none":
    return slice(0, n), slice(0, 0)
  if cfg.search_holdout:
    return slice(0, n - cfg.search_samples), slice(n - cfg.search_samples, n)
  return slice(0, n), slice(0, min(cfg.search_samples, n))


def check_calibration_size(n: int, cfg: PTQConfig) -> None:
  """ValueError unless ``n`` calibration images hold one reconstruction batch and, after
  the search's held-out rows, still one batch (one image without reconstruction) to fit
  the quantizers on."""
  if cfg.reconstruct and n < cfg.batch_size:
    raise ValueError(f"calibration set has {n} images, fewer than the batch size "
                     f"{cfg.batch_size}")
  fit, _ = calibration_split(n, cfg)
  need = cfg.batch_size if cfg.reconstruct else 1
  if fit.stop < need:
    raise ValueError(f"search_samples = {cfg.search_samples} held out of {n} calibration "
                     f"images leaves {max(fit.stop, 0)} to fit the quantizers, fewer than "
                     f"{need} (lower search_samples or set search_holdout=False)")


def check_calibration(net: Network, calib, cfg: PTQConfig) -> jax.Array:
  """Validates calibration images (float NHWC, the first layer's channel count, enough
  of them: ``check_calibration_size``, all finite: ``integrity.check_images``) and
  returns them as float32 on every device (so the states computed from them share one
  placement); ValueError names what is wrong."""
  integrity.check_images(calib, "calibration images", channels=input_channels(net))
  check_calibration_size(calib.shape[0], cfg)
  return parallel.replicate(jnp.asarray(calib, jnp.float32))


def checked_apply(fn: Callable, channels: int) -> Callable:
  """``fn(images)`` that first checks concrete ``images`` as ``check_calibration`` does
  (integer pixels, NCHW, non-finite values are errors, not meaningless logits)."""
  def apply(x):
    if not isinstance(x, jax.core.Tracer):
      integrity.check_images(x, "images", channels=channels)
    return fn(x)
  return apply


def quantize_network(net: Network, calib: jax.Array, cfg: PTQConfig, *,
                     progress: bool = True, metadata: dict | None = None,
                     store: resume.Store | None = None) -> PTQResult:
  """Quantizes a folded network.

  Args:
    net: from ``rapq_jax.read_model``.
    calib: float32 [N, H, W, C] preprocessed calibration images (N >= batch size, plus
      the search's held-out ``search_samples`` with ``search_holdout``).
    cfg: method settings (``rapq_jax.config.for_method``).
    metadata: extra JSON-serialisable facts stored in the result (config, versions...).
    store: where each finished unit (and the search before reconstruction) is saved and,
      on a later call, loaded instead of recomputed, so a killed run resumes with the
      same result. It belongs to one network and calibration set; its config is checked
      (``resume.ConfigMismatchError``).
  Returns:
    PTQResult; for power-of-two settings ``model`` holds integers and int32 exponents.
    ``report['units'][unit]``: seconds, p, ``p_unrounded``, loss curves, activation
    moves and ``act_steps`` (the activation steps run: 0 where the phase provably
    changed nothing, ``reconstruct.act_phase_moves_nothing``) of each reconstructed
    unit; ``report['protocol']``: the protocol's ``name``,
    the ``order`` of the unit stages run (``[unit, 'weights+acts' | 'weights' |
    'acts']``), the units ``not_reconstructed`` and whether the ``input`` quantizer
    (``bits``) was active during calibration (``in_calibration``).
  """
  calib = check_calibration(net, calib, cfg)
  integrity.check_finite(net.params, "network parameters")
  if store is not None:
    store.bind(dataclasses.asdict(cfg), upgrade=current_names)
  specs = unit_specs(net, cfg)
  fit_rows, search_rows = calibration_split(calib.shape[0], cfg)
  images = dict(rows=[search_rows.start, search_rows.stop],
                reconstruction_rows=[fit_rows.start, fit_rows.stop],
                held_out=search_rows.start >= fit_rows.stop)
  fit, sub = calib[fit_rows], calib[search_rows]
  net, factors = align.align(net, cfg.align_scales, wbits=cfg.wbits, abits=cfg.abits,
                             weight_signed=cfg.weight_signed, p=cfg.scale_p,
                             calib=fit[:INIT_SAMPLES])
  # Calibration (initialisation, the search before and reconstruction) runs on cal_net;
  # the search after it and the returned model on net (the same but under 'official',
  # whose calibration leaves the input float).
  cal_net = calibration_network(net, cfg)
  cal_specs = unit_specs(cal_net, cfg)
  key = jax.random.PRNGKey(cfg.seed)
  input_spec = specs[net.units[0].name][1].get("input")
  report = {"units": {}, "search": {}, "protocol": {
      "name": cfg.protocol, "order": [], "not_reconstructed": list(frozen_units(net, cfg)),
      "input": None if input_spec is None else {
          "bits": input_spec.bits, "in_calibration": cal_net is net}},
      "align": {"mode": cfg.align_scales, "factors": {
          k: [float(jnp.min(g)), float(jnp.max(g))] for k, g in factors.items()}}}
  fp_logits = None
  if cfg.search != "none":
    # The search's FP reference logits are computed like the search itself, on the
    # replicated images on every device: split over the devices, their rows (and the
    # search objective's sum over them) were reduced in another order on each device
    # count, moving the objective values in their last bits.
    fp_logits = jax.jit(network_apply)(net, sub)

  search_before = cfg.search in ("before", "both")
  # The activation states of the initialisation serve the search before reconstruction
  # and a method that does not reconstruct; reconstruction initialises its own.
  states = _init_all(cal_net, cal_specs, fit[:INIT_SAMPLES], cfg,
                     acts=not cfg.reconstruct or search_before)
  states.update(_rounded({u: states[u] for u in frozen_units(net, cfg)}))
  act_offsets = {}
  if search_before:
    # Weight exponents are searched on round-to-nearest weights; reconstruction then
    # starts from the moved grids, and activation offsets apply on top of each unit's
    # own initialisation.
    offsets, report["search"]["before"] = _search_before(cal_net, states, cal_specs, sub,
                                                         fp_logits, cfg, store, images, progress)
    if cfg.reconstruct:
      states = _shift_weights(cal_net, states, cal_specs, offsets)
    else:
      states = search.shift_states(_rounded(states), tuple(offsets),
                                   jnp.asarray(list(offsets.values()), jnp.int32))
    act_offsets = {(u, n): o for (u, k, n), o in offsets.items() if k == "a"}
  if cfg.act_presearch:
    act_offsets, report["search"]["acts_before"] = _act_presearch(cal_net, cfg, fit, store,
                                                                progress)

  if cfg.reconstruct:
    states = _reconstruct_all(cal_net, cal_specs, states, act_offsets, fit, cfg, key, store,
                              report, progress)
  states = _with_input_quantizer(net, states, specs, fit, cfg)

  if cfg.search in ("after", "both"):
    states = _search_after(net, specs, states, fit, sub, fp_logits, cfg, key, store, report,
                           progress, images)

  model = None
  if cfg.pot_model:
    model = quantized.from_states(net, states, specs, metadata or {})
    apply = functools.partial(quantized.apply, model)
  else:
    fn = jax.jit(lambda n, st, x: search.quantized_logits(n, st, specs, x))
    apply = functools.partial(fn, net, states)
  return PTQResult(checked_apply(apply, input_channels(net)), model, states, specs, report,
                   net)
