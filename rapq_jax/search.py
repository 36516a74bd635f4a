"""Network-wide search over integer exponents (RAPQ's global PoT adjustment).

Coordinate descent over one integer offset per quantizer: each weight layer's exponents
(all channels shift together) and each activation exponent. For quantizer ``q`` the
candidates ``offset[q] - 1`` and ``offset[q] + 1`` are evaluated in one compiled
function and the best replaces the current one only if it strictly lowers the
objective, so a sweep never increases it. Sweeps repeat until one changes nothing or
``max_sweeps``. The whole search is one ``jax.lax`` program (forward passes only).

Weight offsets are only meaningful for round-to-nearest weights (before AdaRound has
learned a rounding for a grid); after reconstruction only activations are searched.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rapq_jax import objective
from rapq_jax.network import Network, network_apply
from rapq_jax.quantizers import hooks


class SearchResult(NamedTuple):
  """states: updated quantizer states; offsets: int32 [Q] applied per quantizer
  (``names[i]`` = (unit, 'w'|'a', role or point)); objective before and after; sweeps run."""
  states: dict
  offsets: jax.Array
  names: tuple
  before: float
  after: float
  sweeps: int


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


def shift_states(states: dict, names: tuple, offsets) -> dict:
  """Adds ``offsets[i]`` to the exponent of quantizer ``names[i]`` (pure)."""
  out = {u: {"w": dict(s["w"]), "a": dict(s["a"])} for u, s in states.items()}
  for i, (u, kind, name) in enumerate(names):
    field = "log2s" if kind == "w" else "t"
    out[u][kind][name] = {**out[u][kind][name],
                          field: out[u][kind][name][field] + offsets[i].astype(jnp.float32)}
  return out


def quantized_logits(net: Network, states: dict, specs: dict, x):
  """Logits of the network with every quantizer hard (fake-quant)."""
  hk = {u: hooks(s["w"], s["a"], *specs[u], soft=False, acts_on=True)
        for u, s in states.items()}
  return network_apply(net, x, lambda u: hk[u][0], lambda u: hk[u][1])


def search_exponents(net: Network, states: dict, specs: dict, x, fp_logits, *,
                     weights: bool, acts: bool, kind: str = "kl",
                     max_sweeps: int = 3, below_bits: int | None = None) -> SearchResult:
  """Runs the coordinate descent.

  Args:
    net: folded network. states / specs: per unit ``{'w': ..., 'a': ...}`` quantizer
      states and ``(wspecs, aspecs)``; exponents must be integral (hard).
    x: float32 [N, H, W, C] calibration inputs; fp_logits: [N, classes] FP outputs.
    weights / acts: which quantizers to search. kind: 'kl' or 'mse'.
    below_bits: search only quantizers with fewer bits (None: all).
  """
  names = quantizer_names(net, states, weights=weights, acts=acts, specs=specs,
                          below_bits=below_bits)
  n = len(names)

  # The network, states and images are arguments, not closed-over constants: XLA would
  # otherwise fold convolutions over them at compile time (seconds per conv), and equal
  # architectures would not share compiled programs.
  @jax.jit
  def run(offsets0, net, states, x, fp_logits):
    def value(offsets):
      return objective.logits_disagreement(
          quantized_logits(net, shift_states(states, names, offsets), specs, x), fp_logits,
          kind)

    best0 = value(offsets0)

    def visit(q, carry):
      offsets, best, changed = carry
      cands = offsets[None, :] + jnp.array([-1, 1], jnp.int32)[:, None] * jax.nn.one_hot(
          q, n, dtype=jnp.int32)[None, :]
      vals = jax.lax.map(value, cands)
      i = jnp.argmin(vals)
      better = vals[i] < best
      return (jnp.where(better, cands[i], offsets), jnp.where(better, vals[i], best),
              changed | better)

    def sweep(carry):
      offsets, best, _, sweeps = carry
      offsets, best, changed = jax.lax.fori_loop(0, n, visit, (offsets, best, False))
      return offsets, best, changed, sweeps + 1

    def more(carry):
      return carry[2] & (carry[3] < max_sweeps)

    offsets, best, _, sweeps = jax.lax.while_loop(
        more, sweep, (offsets0, best0, jnp.bool_(n > 0), jnp.int32(0)))
    return offsets, best0, best, sweeps

  offsets, before, after, sweeps = run(jnp.zeros((n,), jnp.int32), net, states, x, fp_logits)
  return SearchResult(shift_states(states, names, offsets), offsets, names,
                      float(before), float(after), int(sweeps))
