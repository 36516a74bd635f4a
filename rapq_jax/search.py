"""Network-wide search over integer exponents (RAPQ's global PoT adjustment).

Coordinate descent over one integer offset per quantizer: each weight layer's exponents
(all channels shift together) and each activation exponent. A visit to quantizer ``q``
tries ``offset[q] + 1``, and ``offset[q] - 1`` if that does not strictly lower the
objective; a step that does is taken and the walk continues in its direction one step at
a time while each step strictly lowers it, up to ``reach`` steps in all (``reach=1``: a
single +-1 move). With ``folds > 1`` the images are split into that many equal, disjoint
parts and a step is taken only if it strictly lowers the objective on every part, so a
move must help on several image sets, not fit one. With ``confidence > 0`` a step must
also lower the mean objective by more than that many standard errors of the per-image
change (a one-sided paired test over the images): among the many candidates a search
scores, some lower the objective on its few images by chance. The objective therefore
never increases. Sweeps over all quantizers repeat until every quantizer has been
visited without a move since the last move (a visit that moved and ended on a step that
did not lower the objective counts: its quantizer is at a minimum along its own axis),
or ``max_sweeps``. That is where a sweep that changes nothing would end, with the same
offsets, but without that sweep's visits of quantizers already checked at the current
offsets. A search stopped by ``max_sweeps`` before converging is ``capped``. The whole
search is one ``jax.lax`` program (forward passes only).

Candidates are scored on the logits of the deployed integer model (``deployed_logits``:
``quantized.from_states`` then ``quantized.apply``: round-half-up requantization, biases
on the accumulator grid, aligned residual sums), not on the reconstruction's fake-quant
forward, so the final objective is that of the model the search returns.

Weight offsets are only meaningful for round-to-nearest weights (before AdaRound has
learned a rounding for a grid: a learned rounding is a choice between the floor and
ceil of ``w / 2**e`` on one grid and means nothing on another); after reconstruction
only activations are searched.
"""
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rapq_jax import fake_quant, objective, quantized
from rapq_jax.fake_quant import hooks
from rapq_jax.network import Network, network_apply


class SearchResult(NamedTuple):
  """states: updated quantizer states; offsets: int32 [Q] applied per quantizer
  (``names[i]`` = (unit, 'w'|'a', role or point)); objective before and after; sweeps
  run; capped: stopped at ``max_sweeps`` before converging; evaluations: candidates
  scored (each a forward pass of the units from the moved quantizer's on)."""
  states: dict
  offsets: jax.Array
  names: tuple
  before: float
  after: float
  sweeps: int
  capped: bool
  evaluations: int


def quantizer_names(net: Network, states: dict, *, weights: bool, acts: bool,
                    specs: dict | None = None, below_bits: int | None = None) -> tuple:
  """(unit, kind, name) of every searchable quantizer, in network order; with
  ``below_bits`` only those whose spec (``specs[unit]``) has fewer bits."""
  names = []
  for unit in net.units:
    if weights:
      names += [(unit.name, "w", l.role) for l in unit.layers]
    if acts:
      names += [(unit.name, "a", a.name) for a in unit.acts if a.name in states[unit.name]["a"]]
  if below_bits is not None:
    names = [n for n in names
             if specs[n[0]][0 if n[1] == "w" else 1][n[2]].bits < below_bits]
  return tuple(names)


@functools.partial(jax.jit, static_argnames="names")
def shift_states(states: dict, names: tuple, offsets) -> dict:
  """Adds ``offsets[i]`` to the exponent of quantizer ``names[i]`` (pure, jitted)."""
  out = {u: {"w": dict(s["w"]), "a": dict(s["a"])} for u, s in states.items()}
  for i, (u, kind, name) in enumerate(names):
    state = out[u][kind][name]
    out[u][kind][name] = {**state, "exp": state["exp"] + offsets[i].astype(jnp.float32)}
  return out


def quantized_logits(net: Network, states: dict, specs: dict, x):
  """Logits of the network with every quantizer hard (fake-quant)."""
  hk = {u: hooks(s["w"], s["a"], *specs[u], soft=False, acts_on=True)
        for u, s in states.items()}
  return network_apply(net, x, lambda u: hk[u][0], lambda u: hk[u][1])


def deployed_unit_outputs(net: Network, states: dict, specs: dict, x, cached=None,
                          start=None) -> tuple:
  """Every unit's output (the last: the logits) of the deployed integer model of hard
  power-of-two states, ``quantized.unit_outputs(quantized.from_states(...), x)``
  (jit-able, states may be traced); with ``cached`` and ``start`` the units before
  ``start`` are read from ``cached``."""
  return quantized.unit_outputs(quantized.from_states(net, states, specs, {}), x, cached,
                                start)


def deployed_logits(net: Network, states: dict, specs: dict, x):
  """Logits of the deployed integer model of hard power-of-two states:
  ``quantized.apply(quantized.from_states(...), x)`` (jit-able, states may be traced)."""
  return deployed_unit_outputs(net, states, specs, x)[-1]


@functools.lru_cache(maxsize=None)
def _program(names: tuple, unit_index: tuple, spec_items: tuple, kind: str, folds: int,
             confidence: float):
  """The jitted search ``(net, states, x, fp_logits, max_sweeps, reach) -> (offsets,
  before, after, sweeps, capped)``. It is one ``while_loop`` that evaluates one
  candidate per step, so the network appears once in the compiled program. The loop
  carries every unit's output under the best offsets so far; a candidate moves one
  quantizer of unit ``unit_index[q]``, so only that unit and those after it are
  computed (``quantized.unit_outputs``): the same values as a whole forward pass, in
  about half its time."""
  specs = fake_quant.specs_of(spec_items)
  n = len(names)
  first_unit = jnp.asarray(unit_index or (0,), jnp.int32)   # q < n, and q = 0 when n = 0

  def outputs(net, states, x, offsets, cached=None, start=None):
    return deployed_unit_outputs(net, shift_states(states, names, offsets), specs, x, cached,
                                 start)

  def value(rows):
    """The objective on each of the ``folds`` parts of the images, from each image's
    (``objective.sample_disagreement``): float32 [folds]."""
    return jnp.mean(rows.reshape(folds, -1), axis=1)

  def significant(rows, best_rows):
    """Whether the per-image change ``rows - best_rows`` lowers the mean by more than
    ``confidence`` standard errors (always, at confidence 0: the fold test decides)."""
    if not confidence:
      return jnp.bool_(True)
    d = rows - best_rows
    return jnp.mean(d) + confidence * jnp.std(d, ddof=1) / jnp.sqrt(d.shape[0]) < 0

  # Carry: offsets, best objective, objective before, quantizer q, step (0: the first
  # evaluation, of the offsets as given; else +1 or -1), steps taken at q, sweeps,
  # quantizers checked at the current offsets, candidates scored, done, capped, unit
  # outputs at the offsets, each image's objective at the offsets.
  def probe(net, states, x, fp_logits, max_sweeps, reach, c):
    offsets, best, before, q, step, k, sweeps, checked, scored, _, _, cached, best_rows = c
    cand = offsets + step * jax.nn.one_hot(q, n, dtype=jnp.int32)
    first = step == 0
    # The first evaluation reads every unit from the cache (the offsets as given).
    outs = outputs(net, states, x, cand, cached,
                   jnp.where(first, len(cached), first_unit[q]))
    rows = objective.sample_disagreement(outs[-1], fp_logits, kind)
    v = value(rows)
    scored = scored + ~first
    before = jnp.where(first, v, before)
    better = jnp.all(v < best) & significant(rows, best_rows) & ~first
    offsets, best = jnp.where(better, cand, offsets), jnp.where(better | first, v, best)
    k = k + better
    walk_on = better & (k < reach)
    try_down = ~better & ~first & (k == 0) & (step == 1)
    leave = ~(walk_on | try_down | first)
    step = jnp.where(try_down, -1, jnp.where(leave | first, 1, step))
    # A visit that moved resets the count of quantizers checked at the current offsets
    # to 1 (itself), or to 0 when its walk stopped at ``reach`` still improving.
    checked = jnp.where(leave, jnp.where(k > 0, jnp.where(better, 0, 1), checked + 1), checked)
    converged = leave & (checked >= n)
    q, k = jnp.where(leave, q + 1, q), jnp.where(leave, 0, k)
    wrap = leave & (q == n)
    sweeps = sweeps + (wrap | converged)   # a sweep stopped by convergence counts
    done = converged | (wrap & (sweeps >= max_sweeps))
    capped = done & ~converged
    cached = jax.tree.map(lambda new, old: jnp.where(better, new, old), outs, cached)
    best_rows = jnp.where(better | first, rows, best_rows)
    return (offsets, best, before, jnp.where(wrap, 0, q), step, k, sweeps, checked, scored,
            done | (first & (max_sweeps == 0)), capped, cached, best_rows)

  @jax.jit
  def run(net, states, x, fp_logits, max_sweeps, reach):
    zero = jnp.int32(0)
    inf = jnp.full((folds,), jnp.inf, jnp.float32)
    offsets = jnp.zeros((n,), jnp.int32)
    c = (offsets, inf, inf, zero, zero, zero, zero, zero, zero, jnp.bool_(False),
         jnp.bool_(False), outputs(net, states, x, offsets),
         jnp.zeros((x.shape[0],), jnp.float32))
    step = functools.partial(probe, net, states, x, fp_logits, max_sweeps, reach)
    c = jax.lax.while_loop(lambda c: ~c[9], step, c)
    offsets, best, before, _, _, _, sweeps, _, scored, _, capped, _, _ = c
    # Equal parts: the mean over them is the objective over all the images.
    return offsets, jnp.mean(before), jnp.mean(best), sweeps, capped, scored

  return run


def search_exponents(net: Network, states: dict, specs: dict, x, fp_logits, *,
                     weights: bool, acts: bool, kind: str = "kl", max_sweeps: int = 3,
                     reach: int = 1, below_bits: int | None = None,
                     folds: int = 1, confidence: float = 0.0) -> SearchResult:
  """Runs the coordinate descent.

  Args:
    net: folded network. states / specs: per unit ``{'w': ..., 'a': ...}`` power-of-two
      quantizer states and ``(wspecs, aspecs)``; exponents must be integral (hard).
    x: float32 [N, H, W, C] images to score on; fp_logits: [N, classes] FP outputs.
    weights / acts: which quantizers to search. kind: one of ``objective.SEARCH_OBJECTIVES``.
    reach: most steps one visit walks a quantizer's offset (>= 1).
    below_bits: search only quantizers with fewer bits (None: all).
    folds: equal parts of ``x`` on each of which a step must lower the objective; it
      must divide the number of images.
    confidence: a step must also lower the mean objective by more than this many
      standard errors of its per-image change (0: any decrease).
  """
  if reach < 1:
    raise ValueError(f"reach = {reach!r}: expected an integer >= 1")
  if not confidence >= 0:
    raise ValueError(f"confidence = {confidence!r}: expected a number >= 0")
  if confidence and x.shape[0] < 2:
    raise ValueError(f"confidence = {confidence!r} needs at least 2 search images, got "
                     f"{x.shape[0]}")
  if folds < 1 or x.shape[0] % folds:
    raise ValueError(f"folds = {folds!r}: expected an integer >= 1 dividing the "
                     f"{x.shape[0]} search images")
  names = quantizer_names(net, states, weights=weights, acts=acts, specs=specs,
                          below_bits=below_bits)
  chex.assert_rank(x, 4)
  chex.assert_shape(fp_logits, (x.shape[0], None))
  # The network, states and images are arguments, not closed-over constants: XLA would
  # otherwise fold convolutions over them at compile time (seconds per conv), and equal
  # architectures share compiled programs.
  position = {unit.name: i for i, unit in enumerate(net.units)}
  run = _program(names, tuple(position[u] for u, _, _ in names), fake_quant.spec_items(specs),
                 kind, folds, float(confidence))
  offsets, before, after, sweeps, capped, scored = run(net, states, x, fp_logits,
                                               jnp.int32(max_sweeps if names else 0),
                                               jnp.int32(reach))
  return SearchResult(shift_states(states, names, offsets), offsets, names,
                      float(before), float(after), int(sweeps), bool(capped), int(scored))
