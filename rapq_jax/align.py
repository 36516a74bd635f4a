"""Function-preserving channel rescaling that puts float-optimal scales on powers of two.

A ReLU is positively homogeneous: ``relu(g * z) = g * relu(z)`` for ``g > 0``. Where a
layer's output reaches the next layer only through a ReLU (inside a ResNet basic block or
bottleneck: ``conv1 -> relu1 -> conv2``), multiplying the producer's output channel ``c``
(kernel column and bias) by ``g_c`` and the consumer's input channel ``c`` by ``1 / g_c``
leaves the FP network's function unchanged. Power-of-two quantization is not invariant
to it, and the factors are chosen so that a scale the float methods would use lands
exactly on a power of two:

* ``'weights'``: per producer channel, ``g_c = 2**round(log2 s_c) / s_c`` where ``s_c`` is
  the channel's Lp-optimal weight scale (``pot.lp_scale_search``, the initialisation of
  every method); the producer's PoT grid is then the float grid, ``g_c`` in
  ``[2**-0.5, 2**0.5]``. The ReLU's per-tensor activation grid sees channel ``c`` scaled
  by ``g_c``, and the consumer's per-channel weight scales move a little.
* ``'acts'``: one ``g`` per ReLU point, ``2**round(log2 a) / a`` for the Lp-optimal
  per-tensor scale ``a`` of the FP activation on calibration images: the activation grid
  is the float one; the weight grids of both layers move by ``g``.

Only ReLU points inside a unit qualify (ReLU6 is not homogeneous; a unit's output feeds a
residual sum), except in the third mode:

* ``'stream'`` (rapq's default, ``PTQConfig.align_scales``): one factor ``g`` for the
  values that pass between units (a ResNet's residual stream): every unit but the
  first reads its input scaled by ``g``, every unit but the last writes its output
  scaled by ``g`` (where a unit cannot, as a stem
  ending in ReLU6, the stream starts after it), and inside a unit each layer's
  kernel and bias are scaled so that every residual sum adds operands of one scale
  (``stream_layer_scales``). The block outputs of a CIFAR ResNet stage have nearly one
  Lp scale (ResNet-56: log2 between -1.64 and -1.25 in its first stage, -1.39 and -1.28
  in its second), often halfway between two powers of two; ``g = 2**d``, ``|d| <= 1/2``
  in steps of 1/16, is the shift that brings the log2 Lp scales of the points it
  scales, on average, closest to integers.

* ``'equalize'``: one factor per channel of the stream instead of one for all of it,
  ``rescale_stream`` (a layer absorbs per-channel factors on its input and output as it
  absorbs one; a residual sum ties the channels it adds, across the stages of an
  option-A ResNet too). They balance each channel's activation range against the
  weights reading it, as cross-layer equalization does (``_stream_channels``). Not about
  powers of two, so float methods may use it too (``config.FLOAT_ALIGN_MODES``); with a
  shift-only stream these are the only factors left that may differ along it.

* ``'acts_stream'``: ``'stream'``, then ``'acts'`` on the network it gives: every
  activation point of a ResNet, the block outputs and the inner ReLUs, near the grid.
* ``'weights_stream'``: ``'stream'``, then ``'weights'``: the stream near the grid and
  each block's first conv on it, channel by channel (a unit's last conv writes the
  stream, whose channels no factor can move independently).
* ``'equalize_stream'``: ``'equalize'``, then ``'stream'`` on the network it gives.

The rescaled network is what gets quantized and deployed; it computes the same function
in FP (up to float rounding).
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import pot
from rapq_jax.config import ALIGN_MODES
from rapq_jax.network import Network, unit_apply
from rapq_jax.units import Unit, activation

STREAM_STEPS = 16    # the stream factor's log2 is a multiple of 1 / STREAM_STEPS


def _to_pot(scale: chex.Array) -> chex.Array:
  """``2**round(log2 scale) / scale`` (1 where ``scale`` is not positive)."""
  nearest = pot.log2_exponents(scale)[0]
  return jnp.where(scale > 0, pot.exp2(nearest) / jnp.where(scale > 0, scale, 1.0), 1.0)


def _scaled_bn_target(target: dict, g) -> dict:
  """A layer's BN target once its output channels are multiplied by ``g``: mean and gamma
  by ``g``, variance by ``g**2``."""
  return {**target, "mean": target["mean"] * g, "var": target["var"] * g * g,
          "gamma": target["gamma"] * g}


def rescale_link(net: Network, unit: str, producer: str, consumer: str,
                 g: chex.Array) -> Network:
  """``net`` with ``unit``'s ``producer`` output channels multiplied by ``g`` [C] (kernel,
  bias and BN targets: mean by ``g``, variance by ``g**2``, gamma by ``g``) and the
  matching input channels of ``consumer`` divided by it (grouped consumers included)."""
  u = next(x for x in net.units if x.name == unit)
  params = dict(net.params[unit])
  prod, cons = params[producer], params[consumer]
  chex.assert_shape(g, (prod["kernel"].shape[-1],))
  params[producer] = {"kernel": prod["kernel"] * g, "bias": prod["bias"] * g}
  kernel = cons["kernel"]
  params[consumer] = {"kernel": kernel / g[_input_channels(kernel, u.layer(consumer).groups)],
                      "bias": cons["bias"]}
  targets = dict(net.bn_targets[unit])
  if producer in targets:
    targets[producer] = _scaled_bn_target(targets[producer], g)
  return dataclasses.replace(net, params={**net.params, unit: params},
                             bn_targets={**net.bn_targets, unit: targets})


def _input_channels(kernel: chex.Array, groups: int) -> np.ndarray:
  """``[I, O]``: the input channel that ``kernel[..., i, o]`` reads, ``(o's group) *
  I + i`` (``groups`` groups; ``i`` itself for an ungrouped kernel)."""
  per_group_in, out = kernel.shape[-2], kernel.shape[-1]
  group_of_out = np.arange(out) // (out // groups)
  return group_of_out[None, :] * per_group_in + np.arange(per_group_in)[:, None]


def _same(a, b) -> bool:
  """Two stream scales (a number, or one per channel) are the same everywhere."""
  a, b = np.asarray(a), np.asarray(b)
  return (a.ndim == 0 or b.ndim == 0 or a.shape == b.shape) and bool(np.all(a == b))


def _padded_part(scale, channels: int):
  """The channels of an option-A shortcut's output that carry its input's ``channels``
  (``units.option_a`` pads equally on both sides); a single scale is its own part."""
  scale = np.asarray(scale)
  if scale.ndim == 0:
    return scale
  pad = (scale.shape[0] - channels) // 2
  return scale[pad:pad + channels]


def _needs(program, s_out, c_in: int) -> dict | None:
  """``{value: scale}`` that the values of ``program`` must have for its output to have
  ``s_out``, found backwards through every op but a layer (``c_in``: the input's
  channels where the scales are per channel, else 0); None where a sum's operands would
  need two."""
  need = {program[-1].out: s_out}
  for op in reversed(program):
    if op.out not in need or op.op == "linear":
      continue
    want = need[op.out]
    if op.op == "subsample_pad" and c_in:
      want = _padded_part(want, c_in)
    for v in op.inputs if op.op == "add" else op.inputs[:1]:
      if not _same(need.setdefault(v, want), want):
        return None
  return need


def stream_layer_scales(unit: Unit, s_in, s_out):
  """How ``unit`` maps an input scaled by ``s_in`` to its output scaled by ``s_out``:
  ``({role: (input scale, output scale)}, {value: scale})``, every layer's output at
  scale 1 unless a residual sum or the unit output needs it at another; None where the
  program cannot (a ReLU6 or a sum whose operands would need two scales).

  A scale is a number, or a numpy vector with one factor per channel (``'equalize'``):
  a layer absorbs any factors on its input and output channels, a ReLU, pooling or
  quantizer keeps them, a sum needs them equal and an option-A shortcut maps its input's
  onto the middle of its output's channels.
  """
  program = unit.program
  need = _needs(program, s_out, np.asarray(s_in).shape[0] if np.ndim(s_in) else 0)
  if need is None:
    return None
  scale, layers = {"x": s_in}, {}
  for op in program:
    s = scale[op.inputs[0]]
    if op.op == "linear":
      layers[op.role] = (s, need.get(op.out, 1.0))
      s = layers[op.role][1]
    elif op.op == "subsample_pad" and op.out in need:
      s = need[op.out]
    elif op.op == "add" and not _same(scale[op.inputs[1]], s):
      return None
    elif op.op == "act" and unit.activation != "relu" and not _same(s, 1.0):
      return None
    scale[op.out] = s
  if not _same(scale[program[-1].out], s_out) or not _same(need.get("x", s_in), s_in):
    return None
  return layers, scale


def _rescaled_layer(layer, p: dict, a, b) -> dict:
  """A layer's kernel and bias once its input channels are scaled by ``a`` and its output
  channels by ``b`` (numbers or per-channel vectors)."""
  if np.ndim(a) == 0 and np.ndim(b) == 0:
    return {"kernel": p["kernel"] * (b / a), "bias": p["bias"] * b}
  kernel = p["kernel"]
  a = np.broadcast_to(np.asarray(a, np.float64), (kernel.shape[-2] * layer.groups,))
  factor = np.asarray(b, np.float64) / a[_input_channels(kernel, layer.groups)]
  return {"kernel": kernel * factor.astype(np.float32),
          "bias": p["bias"] * np.asarray(b, np.float32)}


def rescale_stream(net: Network, outs: list):
  """``net`` with unit ``i`` writing its output scaled by ``outs[i]`` (a number or one
  factor per channel; the last at 1) and reading the one before's, and
  ``{unit: {value: scale}}``."""
  params, targets, scales = dict(net.params), dict(net.bn_targets), {}
  s_in = 1.0
  for unit, s_out in zip(net.units, outs):
    mapped = stream_layer_scales(unit, s_in, s_out)
    if mapped is None:
      raise ValueError(f"unit {unit.name!r} cannot map a stream scaled by {s_in} to one "
                       f"scaled by {s_out} (a ReLU6 or a residual sum in the way)")
    layers, scales[unit.name] = mapped
    s_in = s_out
    params[unit.name], targets[unit.name] = dict(params[unit.name]), dict(targets[unit.name])
    for role, (a, b) in layers.items():      # input scale a, output scale b
      params[unit.name][role] = _rescaled_layer(unit.layer(role), params[unit.name][role],
                                                a, b)
      if role in targets[unit.name] and not _same(b, 1.0):
        targets[unit.name][role] = _scaled_bn_target(
            targets[unit.name][role], np.asarray(b, np.float32) if np.ndim(b) else b)
  return dataclasses.replace(net, params=params, bn_targets=targets), scales


def _stream_units(net: Network, g) -> list[bool]:
  """Which units can write their output scaled by ``g`` (a number) for the next to read
  (the first reads the image, the last writes the logits, both at scale 1; a stem or
  last conv ending in ReLU6 cannot, ``stream_layer_scales``)."""
  units = net.units
  reads_g = [i > 0 and any(stream_layer_scales(u, g, s) for s in (g, 1.0))
             for i, u in enumerate(units)]
  writes, s_in = [], 1.0
  for i, unit in enumerate(units):
    writes.append(bool(i + 1 < len(units) and reads_g[i + 1]
                       and stream_layer_scales(unit, s_in, g)))
    s_in = g if writes[-1] else 1.0
  return writes


def _stream_scaled(net: Network, g: float):
  """``net`` with its stream scaled by ``g`` and ``{unit: {value: scale}}``: a unit writes
  its output scaled by ``g`` where it can and the next unit can read it so
  (``_stream_units``); elsewhere at 1."""
  return rescale_stream(net, [g if w else 1.0 for w in _stream_units(net, g)])


def _stream_factor(net: Network, abits: int, p: float, calib: chex.Array) -> float:
  """The stream factor ``2**d`` (``d`` in ``[-1/2, 1/2)``, steps of ``1 / STREAM_STEPS``)
  that brings the log2 Lp scales (``abits``, on ``calib``'s FP activations) of the
  activation points it scales closest to integers on average; 1.0 if none."""
  probe = _stream_scaled(net, 2.0)
  logs, x = [], calib
  for unit in net.units:
    x, seen = _fp_points(unit, net.params[unit.name], x)
    scaled = {op.point for op in unit.program
              if op.op == "quant" and probe[1][unit.name][op.out] != 1.0}
    for point in sorted(scaled):
      h = seen[point]
      lp = pot.lp_scale_search(h, abits, signed=bool(jnp.min(h) < 0), per_channel=False, p=p)
      if float(lp.scale) > 0:
        logs.append(float(jnp.log2(lp.scale)))
  if not logs:
    return 1.0
  logs = jnp.asarray(logs)
  shifts = jnp.arange(-STREAM_STEPS // 2, STREAM_STEPS // 2) / STREAM_STEPS
  distance = jnp.mean(jnp.abs((logs[None] + shifts[:, None]) -
                              jnp.round(logs[None] + shifts[:, None])), axis=1)
  return float(2.0 ** shifts[jnp.argmin(distance)])


def _stream_ties(unit: Unit, c_in: int, c_out: int) -> np.ndarray | None:
  """``[c_in]``: the output channel that each input channel must share its stream factor
  with, as a residual sum adds the input to the output; None where the input reaches
  the output only through layers, which absorb any factors."""
  need = _needs(unit.program, np.arange(c_out, dtype=np.float64), c_in)
  if need is None:
    raise ValueError(f"unit {unit.name!r}: its sums tie channels of the stream to "
                     "several others, which per-channel factors cannot follow")
  return need["x"].astype(int) if "x" in need else None


def _channel_effects(tables: list, n: int, sweeps: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares fit of ``log2 figure = tensor level + channel effect`` to ``tables``
  (one ``(channel ids, figures)`` per tensor; ids ``< n``, figures that are not positive
  left out), by alternating means: ``(effect [n], observed [n])``. Scaling channel ``c``
  of every tensor by ``d_c`` moves its effect by exactly ``log2 d_c``; each connected
  set of channels keeps one free constant (fixed by the alternation's start)."""
  tensor, ids, y = [], [], []
  for k, (t_ids, figures) in enumerate(tables):
    with np.errstate(divide="ignore"):
      logs = np.log2(np.asarray(figures, np.float64))
    keep = np.isfinite(logs)
    tensor.append(np.full(int(keep.sum()), k))
    ids.append(np.asarray(t_ids)[keep])
    y.append(logs[keep])
  if not tables:
    return np.zeros(n), np.zeros(n, bool)
  tensor, ids, y = map(np.concatenate, (tensor, ids, y))
  per_tensor = np.maximum(np.bincount(tensor, minlength=len(tables)), 1)
  per_channel = np.bincount(ids, minlength=n)
  effect = np.zeros(n)
  for _ in range(sweeps):
    level = np.bincount(tensor, y - effect[ids], minlength=len(tables)) / per_tensor
    new = np.bincount(ids, y - level[tensor], minlength=n) / np.maximum(per_channel, 1)
    done = np.max(np.abs(new - effect), initial=0.0) < 1e-12
    effect = new
    if done:
      break
  return effect, per_channel > 0


def _stream_channels(net: Network, abits: int, p: float, calib: chex.Array) -> list:
  """Per-channel stream factors ``v`` (what ``rescale_stream`` multiplies each unit output
  by), one vector per unit output that the stream factor could scale (``_stream_units``),
  1.0 elsewhere. They balance the stream's per-tensor activation grids against the
  per-channel weight grids of the layers that read it, as cross-layer equalization does:
  ``v_c = sqrt(w_c / a_c)`` puts channel ``c``'s activation scale and largest weight
  both at ``sqrt(a_c * w_c)``, for ``a_c`` and ``w_c`` the channel effects
  (``_channel_effects``) of the Lp activation scales of the unit outputs (``abits``, on
  ``calib``'s FP activations) and of the largest weights of the layers reading them,
  ``c`` one channel of every unit output that residual sums tie together
  (``_stream_ties``). So the factors follow the function, not how its channels happen
  to be scaled, and a second equalization finds nothing to move; their geometric mean is
  1, and a channel without both figures keeps 1."""
  writes = _stream_units(net, 2.0)
  acts, weights = [], []                # (tied channel ids, figures) per tensor
  x, ids, n, groups = calib, None, 0, []
  for i, unit in enumerate(net.units):
    params = net.params[unit.name]
    y = _fp_out(unit, params, x)
    c_in, c_out = x.shape[-1], y.shape[-1]
    s_out = np.full(c_out, 2.0) if writes[i] else 1.0
    if ids is not None:                 # the layers whose input channels are the stream's
      for role, (a, _) in stream_layer_scales(unit, np.full(c_in, 2.0), s_out)[0].items():
        if np.ndim(a):
          kernel = np.abs(np.asarray(params[role]["kernel"]))
          w = np.zeros(c_in)
          np.maximum.at(w, _input_channels(kernel, unit.layer(role).groups),
                        kernel.reshape(-1, *kernel.shape[-2:]).max(axis=0))
          weights.append((ids, w))
    if writes[i]:
      out_ids = np.arange(n, n + c_out)
      ties = _stream_ties(unit, c_in, c_out) if ids is not None else None
      if ties is not None:
        out_ids[ties] = ids
      n += c_out
      lp = pot.lp_scale_search(y, abits, signed=bool(jnp.min(y) < 0), per_channel=True, p=p)
      acts.append((out_ids, np.asarray(lp.scale)))
      ids = out_ids
    else:
      ids = None
    groups.append(ids)
    x = y
  (log_a, seen_a), (log_w, seen_w) = _channel_effects(acts, n), _channel_effects(weights, n)
  log_v = np.where(seen_a & seen_w, 0.5 * (log_w - log_a), 0.0)
  used = np.unique(np.concatenate([g for g in groups if g is not None] or [np.zeros(0, int)]))
  if used.size:
    log_v[used] -= np.mean(log_v[used])
  return [1.0 if g is None else 2.0 ** log_v[g] for g in groups]


def align(net: Network, mode: str, *, wbits: int, abits: int, weight_signed: bool,
          p: float, calib: chex.Array | None = None) -> tuple[Network, dict]:
  """The rescaled network and ``{'unit/point': g}`` ([C] factors).

  Args:
    net: a folded network.
    mode: one of ``ALIGN_MODES`` (``'none'`` returns ``net``; so does ``'stream'``
      where no unit can write a scaled stream that the next can read).
    wbits / abits: the bit widths of the rescaled layers and ReLU points.
    weight_signed: the weight quantizers' range (``PTQConfig.weight_signed``).
    p: the Lp exponent of the scale searches (``PTQConfig.scale_p``).
    calib: float32 NHWC calibration images (every mode but ``'none'`` and ``'weights'``:
      the factors come from the FP activations of these).
  Returns ``{'stream': [g]}`` as the factors of ``'stream'``, ``{'unit/out': [C]}`` for
  each unit output that ``'equalize'`` scales (with those of ``'acts'``, ``'weights'``
  or ``'equalize'`` for their ``_stream`` compositions).
  """
  if mode not in ALIGN_MODES:
    raise ValueError(f"align_scales = {mode!r}: expected one of {ALIGN_MODES}")
  if mode not in ("none", "weights") and calib is None:
    raise ValueError(f"align_scales = {mode!r} needs calibration images")
  factors = {}
  if mode == "none":
    return net, factors
  if mode.endswith("_stream"):
    other = mode.removesuffix("_stream")
    # 'equalize' shapes the stream itself, so the stream factor comes after it; the
    # inner modes rescale links that the stream factor would move again.
    order = (other, "stream") if other == "equalize" else ("stream", other)
    for step in order:
      net, more = align(net, step, wbits=wbits, abits=abits, weight_signed=weight_signed,
                        p=p, calib=calib)
      factors.update(more)
    return net, factors
  if mode == "equalize":
    outs = _stream_channels(net, abits, p, calib)
    return rescale_stream(net, outs)[0], {
        f"{unit.name}/out": jnp.asarray(v) for unit, v in zip(net.units, outs) if np.ndim(v)}
  if mode == "stream":
    g = _stream_factor(net, abits, p, calib)
    if g == 1.0:
      return net, factors
    return _stream_scaled(net, g)[0], {"stream": jnp.full((1,), g)}
  x = calib
  for unit in net.units:
    for producer, point, consumer in unit.rescalable_links:
      if mode == "weights":
        lp = pot.lp_scale_search(net.params[unit.name][producer]["kernel"], wbits,
                                 signed=weight_signed, per_channel=True, p=p)
        g = _to_pot(lp.scale)
      else:
        h = activation(unit.activation, _fp_pre(unit, net.params[unit.name], x)[producer])
        lp = pot.lp_scale_search(h, abits, signed=False, per_channel=False, p=p)
        g = jnp.full(h.shape[-1:], _to_pot(lp.scale))
      net = rescale_link(net, unit.name, producer, consumer, g)
      factors[f"{unit.name}/{point}"] = g
    if mode == "acts":
      x = _fp_out(unit, net.params[unit.name], x)
  return net, factors


@functools.partial(jax.jit, static_argnums=0)
def _fp_pre(unit: Unit, params: dict, x: chex.Array) -> dict:
  return unit_apply(unit, params, x)[1]


@functools.partial(jax.jit, static_argnums=0)
def _fp_out(unit: Unit, params: dict, x: chex.Array) -> chex.Array:
  return unit_apply(unit, params, x)[0]


@functools.partial(jax.jit, static_argnums=0)
def _fp_points(unit: Unit, params: dict, x: chex.Array) -> tuple[chex.Array, dict]:
  """The unit's FP output and ``{point: value}`` of its activation points."""
  seen = {}

  def aq(point, h):
    seen[point] = h
    return h

  return unit_apply(unit, params, x, aq=aq)[0], seen
