"""Reads a user's own ``flax.linen`` model into a folded ``Network``, unchanged.

The model is run once in inference mode under ``nn.intercept_methods``: every
``nn.Conv``, ``nn.BatchNorm`` and ``nn.Dense`` call is recorded with its module path,
input and output. Reconstruction units are the calls of modules whose path matches one
of ``unit_patterns`` (default ``("*",)``: the top-level submodules); layers called
outside any unit become units of their own, and a BatchNorm is folded into the conv
whose output it reads. Each unit is then mapped onto a supported unit kind (conv, ResNet
basic/bottleneck block, MobileNetV2 inverted residual, pooled classifier) and the
mapping is checked numerically against the recorded model on the calibration images, so
a model is never silently mis-read: what cannot be matched raises ``UnsupportedModelError``
naming the module path.

What the user's code does between layers (ReLU/ReLU6, residual additions, option-A or
conv shortcuts, the stem's 3x3/2 max-pool, global average pooling) is not intercepted;
it is inferred from the recorded tensors and verified. ``flax.nnx`` modules are not
supported (see ``read_model``).
"""
import dataclasses
import fnmatch
import itertools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import fold, integrity, ptq, resume
from rapq_jax.config import PTQConfig
from rapq_jax.network import Layer, Network, Unit, unit_acts, unit_apply

LAYER_TYPES = (nn.Conv, nn.Dense, nn.BatchNorm)
VERIFY_SAMPLES = 8
# The mapping is also checked on the images times this gain, so that activations exceed
# 6 somewhere and ReLU and ReLU6 cannot be confused.
VERIFY_GAIN = 64.0
# A candidate unit matches the model when max |ours - model| <= RTOL * (1 + max |model|).
RTOL = 1e-4


class UnsupportedModelError(ValueError):
  """The user's model has a layer or wiring that rapq_jax cannot quantize."""


@dataclasses.dataclass
class _Call:
  """One intercepted ``__call__``: module path, module, first argument, output."""
  path: tuple[str, ...]
  module: nn.Module
  x: Any
  out: Any = None

  @property
  def name(self) -> str:
    return "/".join(self.path)


def _capture(model: nn.Module, variables, x, apply_kwargs: dict):
  """Runs the model on ``x`` recording every submodule call in call order (pre-order)."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name != "__call__" or not path:
      return next_fun(*args, **kwargs)
    call = _Call(path, context.module, args[0] if args else None)
    calls.append(call)
    call.out = next_fun(*args, **kwargs)
    return call.out

  with nn.intercept_methods(interceptor):
    try:
      logits = model.apply(variables, x, **apply_kwargs)
    except flax.errors.ModifyScopeVariableError as e:
      raise UnsupportedModelError(
          f"the model updates its variables when applied ({e}); quantization needs it in "
          "inference mode: pass apply_kwargs such as {'train': False} so that every "
          "BatchNorm uses its running averages") from e
  return calls, logits


def _matches(path: tuple[str, ...], patterns: Sequence[str]) -> bool:
  """Whether a module path matches a '/'-separated pattern segment by segment."""
  for pattern in patterns:
    parts = pattern.split("/")
    if len(parts) == len(path) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(path, parts)):
      return True
  return False


def _own_params(variables, path) -> bool:
  tree = variables.get("params", {})
  for part in path:
    tree = tree.get(part, {}) if isinstance(tree, dict) else {}
  return isinstance(tree, dict) and any(not isinstance(v, dict) for v in tree.values())


@dataclasses.dataclass
class _Group:
  """The calls that make up one unit: ``x`` its recorded input (argument of call number
  ``index``), ``layers`` in call order."""
  name: str
  index: int
  x: Any
  layers: list


def _groups(calls: list[_Call], variables, patterns: Sequence[str]) -> list[_Group]:
  """Splits the recorded calls into units; checks every layer is supported."""
  counts = {}
  for c in calls:
    counts[c.path] = counts.get(c.path, 0) + 1
    if counts[c.path] == 2 and type(c.module) in LAYER_TYPES:
      raise UnsupportedModelError(f"layer {c.name!r} is called more than once; shared "
                                  "weights are not supported")
    if type(c.module) not in LAYER_TYPES and _own_params(variables, c.path):
      raise UnsupportedModelError(
          f"unsupported layer {c.name!r} of type {type(c.module).__name__}: supported "
          "layers are nn.Conv, nn.BatchNorm and nn.Dense (plus parameter-free functions "
          "and modules such as relu, relu6, avg_pool, max_pool)")
  groups, current = [], None
  for i, c in enumerate(calls):
    inside = current is not None and c.path[:len(current[0])] == current[0]
    if inside:
      if type(c.module) in LAYER_TYPES:
        current[1].layers.append(c)
      continue
    current = None
    if _matches(c.path, patterns):
      group = _Group(c.name.replace("/", "."), i, c.x, [])
      groups.append(group)
      current = (c.path, group)
      if type(c.module) in LAYER_TYPES:
        group.layers.append(c)
    elif type(c.module) in LAYER_TYPES:
      groups.append(_Group(c.name.replace("/", "."), i, c.x, [c]))
  return _merge_batchnorms(groups)


def _merge_batchnorms(groups: list[_Group]) -> list[_Group]:
  """Moves a group made only of BatchNorms into the group of the conv each one reads."""
  merged = []
  for g in groups:
    if g.layers and all(isinstance(c.module, nn.BatchNorm) for c in g.layers) and merged:
      prev = merged[-1]
      if all(any(c.x is p.out for p in prev.layers) for c in g.layers):
        prev.layers.extend(g.layers)
        continue
    if not g.layers:
      continue  # a parameter-free module: its effect is checked with the units around it
    merged.append(g)
  return merged


def _padding(conv: nn.Conv, x_shape) -> list[tuple[int, int]]:
  """The explicit (lo, hi) padding per spatial dim that ``conv`` applies to ``x_shape``."""
  kernel, strides = conv.kernel_size, conv.strides or (1,) * len(conv.kernel_size)
  strides = (strides,) * len(kernel) if isinstance(strides, int) else strides
  pad = conv.padding
  if isinstance(pad, str):
    if pad == "VALID":
      return [(0, 0)] * len(kernel)
    if pad != "SAME":
      raise UnsupportedModelError(f"conv padding {pad!r} is not supported")
    out = []
    for size, k, s in zip(x_shape[1:-1], kernel, strides):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      out.append((total // 2, total - total // 2))
    return out
  if isinstance(pad, int):
    return [(pad, pad)] * len(kernel)
  return [(p, p) if isinstance(p, int) else tuple(p) for p in pad]


def _layer(c: _Call, role: str) -> Layer:
  """A ``Layer`` for a recorded conv or dense call; raises for what the unit kinds lack."""
  m = c.module
  if isinstance(m, nn.Dense):
    return Layer(role, c.name, dense=True)
  k = tuple(m.kernel_size)
  strides = m.strides or (1, 1)
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  problems = []
  if len(k) != 2 or k[0] != k[1]:
    problems.append(f"kernel {k} (square 2-D kernels only)")
  if len(set(strides)) != 1:
    problems.append(f"strides {strides} (equal strides only)")
  for attr in ("kernel_dilation", "input_dilation"):
    d = getattr(m, attr)
    if d not in (None, 1) and any(v != 1 for v in np.atleast_1d(d)):
      problems.append(f"{attr} {d}")
  pads = _padding(m, c.x.shape)
  if any(p != (k[0] // 2, k[0] // 2) for p in pads):
    problems.append(f"padding {pads} for input {tuple(c.x.shape[1:3])} (only symmetric "
                    f"kernel_size // 2 = {k[0] // 2} padding, e.g. padding={k[0] // 2} or "
                    "'SAME' at stride 1)")
  if problems:
    raise UnsupportedModelError(f"conv {c.name!r}: unsupported " + "; ".join(problems))
  return Layer(role, c.name, stride=strides[0], groups=m.feature_group_count)


def _candidates(g: _Group, first: bool, last: bool) -> list[tuple[Unit, list[_Call]]]:
  """Possible unit structures for a group's weight layers (convs with BN folded in)."""
  weights = [c for c in g.layers if not isinstance(c.module, nn.BatchNorm)]
  convs = [c for c in weights if isinstance(c.module, nn.Conv)]
  dense = [c for c in weights if isinstance(c.module, nn.Dense)]
  unknown = [c for c in weights if not isinstance(c.module, (nn.Conv, nn.Dense))]
  if unknown:
    raise UnsupportedModelError(f"unsupported layer {unknown[0].name!r}")
  if dense:
    if convs or len(dense) > 1 or not last:
      raise UnsupportedModelError(
          f"dense layer {dense[0].name!r}: nn.Dense is supported only as the classifier, "
          "alone in the last unit after global average pooling")
    return [(Unit(g.name, "head", (_layer(dense[0], "fc"),), unit_acts("head", ("fc",))),
             dense)]
  out = []
  acts = ("relu", "relu6")
  if len(convs) == 1:
    layer = _layer(convs[0], "conv")
    for act, pool in itertools.product(acts, (False, True)):
      out.append((Unit(g.name, "conv", (layer,), unit_acts("conv", ("conv",), network_input=first),
                       activation=act, maxpool=pool), convs))
    return out
  depthwise = [c for c in convs if c.module.feature_group_count > 1]
  if depthwise:
    roles = ("expand", "dw", "project") if len(convs) == 3 else ("dw", "project")
    if len(convs) not in (2, 3) or convs[len(roles) - 2] is not depthwise[0]:
      raise UnsupportedModelError(
          f"unit {g.name!r}: a depthwise conv is supported only inside a MobileNetV2 "
          "inverted residual ([1x1 expand,] depthwise, 1x1 project)")
    layers = tuple(_layer(c, r) for c, r in zip(convs, roles))
    for act, short in itertools.product(("relu6", "relu"), ("identity", "none")):
      out.append((Unit(g.name, "inverted", layers, unit_acts("inverted", roles),
                       shortcut=short, activation=act), convs))
    return out
  # ResNet blocks: the main path, then (if any) a conv that reads the unit input too.
  readers = [c for c in convs if c.x is g.x]
  shortcut = readers[1] if len(readers) > 1 else None
  main = [c for c in convs if c is not shortcut]
  if len(main) not in (2, 3):
    raise UnsupportedModelError(
        f"unit {g.name!r} has {len(convs)} convs ({', '.join(c.name for c in convs)}); "
        "supported: 1 conv, a ResNet basic (2) or bottleneck (3) block with an optional "
        "1x1 shortcut conv, or a MobileNetV2 inverted residual")
  kind = "basic" if len(main) == 2 else "bottleneck"
  roles = ("conv1", "conv2", "conv3")[:len(main)]
  layers = tuple(_layer(c, r) for c, r in zip(main, roles))
  ordered = main
  shorts = ("identity", "option_a")
  if shortcut is not None:
    layers += (_layer(shortcut, "shortcut"),)
    ordered = main + [shortcut]
    shorts = ("conv",)
  for act, short in itertools.product(acts, shorts):
    out.append((Unit(g.name, kind, layers, unit_acts(kind, roles), shortcut=short,
                     activation=act), ordered))
  return out


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _fold_group(variables, g: _Group, layers: list[_Call], roles: Sequence[str]):
  """Folded ``{role: {'kernel', 'bias'}}`` and BN targets of a group's weight layers."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  bns = {id(c.x): c for c in g.layers if isinstance(c.module, nn.BatchNorm)}
  folded, targets = {}, {}
  for c, role in zip(layers, roles):
    p = _get(params, c.path)
    bias = p.get("bias")
    bn = bns.pop(id(c.out), None)
    if bn is None:
      folded[role] = {"kernel": p["kernel"],
                      "bias": jnp.zeros(p["kernel"].shape[-1]) if bias is None else bias}
      continue
    m = bn.module
    if m.axis not in (-1, c.out.ndim - 1):
      raise UnsupportedModelError(f"BatchNorm {bn.name!r} normalizes axis {m.axis}; only "
                                  "the channel (last) axis is supported")
    bp = _get(params, bn.path)
    ones = jnp.ones(p["kernel"].shape[-1])
    bn_params = {"scale": bp.get("scale", ones), "bias": bp.get("bias", 0 * ones)}
    k, b, t = fold.fold_bn(p["kernel"], bias, bn_params, _get(stats, bn.path), m.epsilon)
    folded[role], targets[role] = {"kernel": k, "bias": b}, t
  if bns:
    bn = next(iter(bns.values()))
    raise UnsupportedModelError(f"BatchNorm {bn.name!r} does not directly follow a conv of "
                                f"its unit; only a BatchNorm applied to a conv's output can "
                                "be folded")
  return folded, targets


def _close(ours, ref) -> bool:
  if ours.shape != ref.shape:
    if ours.ndim == 4 and ref.ndim == 2:   # the model pools before its classifier
      ours = jnp.mean(ours, axis=(1, 2))
    if ours.shape != ref.shape:
      return False
  err = float(jnp.max(jnp.abs(ours - ref)))
  return err <= RTOL * (1.0 + float(jnp.max(jnp.abs(ref))))


def read_model(model: nn.Module, variables, images, *, unit_patterns: Sequence[str] = ("*",),
               apply_kwargs: dict | None = None) -> Network:
  """Folds a user's linen model into a ``Network`` of reconstruction units.

  Args:
    model: a ``flax.linen`` Module made of nn.Conv, nn.BatchNorm, nn.Dense and
      parameter-free functions (relu, relu6, pooling, additions). ``flax.nnx`` modules
      are not supported: their layers are plain objects that ``nn.intercept_methods``
      cannot see; wrap the same architecture in linen or use ``rapq_jax.models``.
    variables: ``{'params', 'batch_stats'}`` of the model.
    images: float NHWC images the model accepts (the first ``VERIFY_SAMPLES`` are run).
    unit_patterns: '/'-separated module path patterns (fnmatch per segment) whose
      calls are reconstruction units, e.g. ``("stage*/block*",)``.
    apply_kwargs: extra keyword arguments of ``model.apply`` for inference
      (e.g. ``{'train': False}``).
  Returns:
    The folded ``Network``; its forward equals the model's within ``RTOL``.
  Raises:
    UnsupportedModelError naming the module path of what cannot be read.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"expected a flax.linen Module, got {type(model).__name__}; flax.nnx "
                    "modules are not supported (see rapq_jax.adapter.read_model)")
  integrity.check_images(images, "calibration images")
  integrity.check_finite(variables, "model variables")
  x = jnp.asarray(images[:VERIFY_SAMPLES], jnp.float32)
  apply_kwargs = dict(apply_kwargs or {})
  try:
    calls, logits = _capture(model, variables, x, apply_kwargs)
  except UnsupportedModelError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (flax shape errors are no ValueError)
    raise ValueError(f"the model cannot be applied to the calibration images of shape "
                     f"{tuple(images.shape)} ({type(e).__name__}: {str(e)[:300]}); images must "
                     "be float NHWC (channels last)" + (
                         f"; shape[1] = {images.shape[1]} looks like channels-first (NCHW): "
                         "transpose with x.transpose(0, 2, 3, 1)"
                         if images.shape[1] < images.shape[-1] else "")) from e
  groups = _groups(calls, variables, tuple(unit_patterns))
  # The same run on amplified images: reference tensors of every unit in both runs.
  loud_calls, loud_logits = _capture(model, variables, x * VERIFY_GAIN, apply_kwargs)
  refs = [(calls[g.index].x, loud_calls[g.index].x) for g in groups[1:]]
  refs.append((logits, loud_logits))
  if not groups:
    raise UnsupportedModelError("the model called no nn.Conv or nn.Dense layer")
  units, params, targets = [], {}, {}
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise UnsupportedModelError(f"unit names are not unique: {names}")
  hs = (x, x * VERIFY_GAIN)
  for i, g in enumerate(groups):
    last = i == len(groups) - 1
    tried = []
    for unit, layers in _candidates(g, first=i == 0, last=last):
      p, t = _fold_group(variables, g, layers, [l.role for l in unit.layers])
      p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
      try:
        ys = tuple(unit_apply(unit, p, h)[0] for h in hs)
      except TypeError:      # shapes that cannot be added: not this structure
        ys = None
      if ys is not None and all(_close(y, r) for y, r in zip(ys, refs[i])):
        units.append(unit)
        params[unit.name] = p
        targets[unit.name] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
        hs = ys
        break
      tried.append(f"{unit.kind} (activation {unit.activation}, shortcut {unit.shortcut}"
                   f"{', max-pool' if unit.maxpool else ''})")
    else:
      raise UnsupportedModelError(
          f"unit {g.name!r} (layers {', '.join(c.name for c in g.layers)}) matches none of "
          f"the supported structures it resembles: {'; '.join(tried)}. Its output (or the "
          "next unit's input) differs from the model's")
  if units[-1].kind != "head":
    raise UnsupportedModelError(
        f"the model must end in global average pooling and an nn.Dense classifier; its "
        f"last unit {units[-1].name!r} is a {units[-1].kind}")
  return Network(tuple(units), params, targets)


def quantize(model: nn.Module, variables, calibration, cfg: PTQConfig | None = None, *,
             unit_patterns: Sequence[str] = ("*",), apply_kwargs: dict | None = None,
             progress: bool = True, store: resume.Store | None = None) -> ptq.PTQResult:
  """Quantizes a user's linen model with power-of-two scales (RAPQ by default).

  Args:
    model, variables: the trained model (see ``read_model`` for what is supported).
    calibration: float32 [N, H, W, C] images preprocessed as the model expects.
    cfg: method settings (default ``rapq_jax.config.for_method('rapq')``).
    store: ``rapq_jax.resume.Store``: finished units are saved there and a later call
      with the same store resumes after the last one (see ``ptq.quantize_network``).
  Returns:
    ``PTQResult``: ``apply(images) -> logits`` of the quantized model and its integer
    ``QuantizedModel``.
  """
  cfg = cfg or PTQConfig()
  net = read_model(model, variables, calibration, unit_patterns=unit_patterns,
                   apply_kwargs=apply_kwargs)
  return ptq.quantize_network(net, calibration, cfg, progress=progress, store=store,
                              metadata={"model": type(model).__name__,
                                        "units": [u.name for u in net.units]})
