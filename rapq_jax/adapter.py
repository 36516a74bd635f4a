"""Reads a user's own ``flax.linen`` or ``flax.nnx`` model into a folded ``Network``, unchanged.

The model is run once in inference mode with its layer calls recorded: every
``nn.Conv``/``nnx.Conv``, ``nn.BatchNorm``/``nnx.BatchNorm`` and ``nn.Dense``/``nnx.Linear``
call is recorded with its module path, input and output, by ``nn.intercept_methods`` for
linen and, for NNX (which has no interception hook), by wrapping the ``__call__`` of the
model's Module classes while a copy of the model runs (``_capture_nnx``). Both produce
the same record (``_Call``), and everything after it is shared. Reconstruction units are
the calls the model's own forward makes (or, with ``unit_patterns``, the calls of modules
whose path matches one of them); layers called outside any unit become units of their
own, and a BatchNorm is folded into the conv whose output it reads. Each unit is then
mapped onto a supported unit kind (conv, ResNet basic/bottleneck block, MobileNetV2
inverted residual, pooled classifier) and the mapping is checked numerically against the
recorded model on the calibration images, so a model is never silently mis-read: what
cannot be matched raises ``UnsupportedModelError`` naming the module path (for NNX, the
attribute path, e.g. ``blocks/0/norm``).

What the user's code does between layers (ReLU/ReLU6, residual additions, option-A or
conv shortcuts, the stem's 3x3/2 max-pool, global average pooling) is not intercepted;
it is inferred from the recorded tensors and verified.
"""
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import itertools
import threading
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import fold, integrity, ptq, resume, units
from rapq_jax.config import PTQConfig
from rapq_jax.network import Network, unit_apply
from rapq_jax.units import Layer, Unit

# The layers read into units, by exact type. Linen's and NNX's versions share the names of
# the attributes read here (kernel_size, strides, padding, input_dilation,
# kernel_dilation, feature_group_count; axis, epsilon) and their parameters' layout, so
# one description of units serves both.
LAYER_KINDS = {nn.Conv: "conv", nn.Dense: "dense", nn.BatchNorm: "bn",
               nnx.Conv: "conv", nnx.Linear: "dense", nnx.BatchNorm: "bn"}
SUPPORTED_LAYERS = "nn.Conv/nnx.Conv, nn.BatchNorm/nnx.BatchNorm and nn.Dense/nnx.Linear"
VERIFY_SAMPLES = 8
# The mapping is also checked on the images times this gain, so that activations exceed
# 6 somewhere and ReLU and ReLU6 cannot be confused.
VERIFY_GAIN = 64.0
# A candidate unit matches the model when max |ours - model| <= RTOL * (1 + max |model|).
RTOL = 1e-4
# Activations that agree on inputs up to 6: the adapter cannot always tell them apart.
_TWINS = {"relu": "relu6", "relu6": "relu"}


class UnsupportedModelError(ValueError):
  """The user's model has a layer or wiring that rapq_jax cannot quantize."""


@dataclasses.dataclass
class _Call:
  """One recorded ``__call__``: module path, module (linen or NNX), first argument,
  nesting depth (1 for the calls the model's own forward makes) and output."""
  path: tuple[str, ...]
  module: Any
  x: Any
  depth: int = 1
  out: Any = None

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def kind(self) -> str | None:
    """'conv', 'dense' or 'bn' for a supported layer, else None."""
    return LAYER_KINDS.get(type(self.module))


class _Recorder:
  """Records submodule calls in call order (pre-order) with their nesting depth: the one
  record that linen's interception and NNX's wrapped ``__call__`` both fill."""

  def __init__(self):
    self.calls: list[_Call] = []
    self._open: list[_Call] = []

  def __call__(self, path, module, fun, args, kwargs):
    if self._open and self._open[-1].module is module:   # e.g. super().__call__
      return fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()), None)
    call = _Call(path, module, x, depth=len(self._open) + 1)
    self.calls.append(call)
    self._open.append(call)
    try:
      call.out = fun(*args, **kwargs)
    finally:
      self._open.pop()
    return call.out


def _capture(model: nn.Module, variables, x, apply_kwargs: dict):
  """Runs a linen model on ``x`` recording every submodule call."""
  record = _Recorder()

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name != "__call__" or not path:
      return next_fun(*args, **kwargs)
    return record(path, context.module, next_fun, args, kwargs)

  with nn.intercept_methods(interceptor):
    try:
      logits = model.apply(variables, x, **apply_kwargs)
    except flax.errors.ModifyScopeVariableError as e:
      raise UnsupportedModelError(
          f"the model updates its variables when applied ({e}); quantization needs it in "
          "inference mode: pass apply_kwargs such as {'train': False} so that every "
          "BatchNorm uses its running averages") from e
  return record.calls, logits


# Wrapping the classes' __call__ is process-wide: one NNX capture at a time.
_NNX_CAPTURE_LOCK = threading.Lock()


def _nnx_path(path) -> tuple[str, ...]:
  return tuple(str(p) for p in path)


def _nnx_variables(model: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Variable]]:
  return [(_nnx_path(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]


def _linen_layout(model: nnx.Module) -> dict:
  """An NNX model's parameters and BatchNorm statistics as linen variables,
  ``{'params': ..., 'batch_stats': ...}`` nested by attribute path."""
  out = {}
  for path, var in _nnx_variables(model):
    col = ("params" if isinstance(var, nnx.Param) else
           "batch_stats" if isinstance(var, nnx.BatchStat) else None)
    if col is not None:
      tree = out.setdefault(col, {})
      for part in path[:-1]:
        tree = tree.setdefault(part, {})
      tree[path[-1]] = var.get_value()
  return out


@contextlib.contextmanager
def _calls_wrapped(classes, wrap: Callable):
  """Replaces each class's own ``__call__`` function ``f`` by ``wrap(f)`` meanwhile."""
  originals = {c: vars(c)["__call__"] for c in classes}
  try:
    for cls, fun in originals.items():
      setattr(cls, "__call__", wrap(fun))
    yield
  finally:
    for cls, fun in originals.items():
      setattr(cls, "__call__", fun)


def _call_owner(cls: type) -> type | None:
  """The class whose own ``__call__`` function instances of ``cls`` run, if any."""
  owner = next((k for k in cls.__mro__ if "__call__" in vars(k)), None)
  return owner if owner is not None and inspect.isfunction(vars(owner)["__call__"]) else None


def _capture_nnx(model: nnx.Module, x, apply_kwargs: dict):
  """Runs a copy of an NNX model on ``x`` recording every submodule call.

  flax.nnx has no hook for intercepting calls (its own ``nnx.capture(method_outputs=...)``
  also wraps the Module classes' methods, and records outputs only): the ``__call__`` of
  every Module class in the model is wrapped while the copy runs and restored afterwards,
  also when the forward raises. The wrapper records the calls of the copy's submodules,
  by attribute path, and passes any other instance's call through. The user's model is
  never run, so nothing it holds changes; a forward that updates the copy's variables
  (BatchNorm statistics in training mode, dropout's RNG counts) is refused.
  """
  copy = nnx.clone(model)
  paths = {id(m): _nnx_path(p) for p, m in nnx.iter_modules(copy)}
  owners = {_call_owner(type(m)) for _, m in nnx.iter_modules(copy)} - {None}
  record = _Recorder()

  def wrap(fun):
    @functools.wraps(fun)
    def recorded_call(self, *args, **kwargs):
      path = paths.get(id(self))
      if not path:     # the model itself, or a module outside it
        return fun(self, *args, **kwargs)
      return record(path, self, functools.partial(fun, self), args, kwargs)
    return recorded_call

  before = {p: v.get_value() for p, v in _nnx_variables(copy)}
  with _NNX_CAPTURE_LOCK, _calls_wrapped(owners, wrap):
    logits = copy(x, **apply_kwargs)
  for path, var in _nnx_variables(copy):   # sown intermediates may come and go
    if path in before and not isinstance(var, nnx.Intermediate) and \
        var.get_value() is not before[path]:
      raise UnsupportedModelError(
          f"the model updates its variable {'/'.join(path)!r} ({type(var).__name__}) when "
          "called; quantization needs it in inference mode: call model.eval() first (every "
          "nnx.BatchNorm then uses its running averages) or pass apply_kwargs that select "
          "inference")
  return record.calls, logits


def _matches(path: tuple[str, ...], patterns: Sequence[str]) -> bool:
  """Whether a module path matches a '/'-separated pattern segment by segment."""
  for pattern in patterns:
    parts = pattern.split("/")
    if len(parts) == len(path) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(path, parts)):
      return True
  return False


def _is_unit(patterns: Sequence[str] | None) -> Callable[[_Call], bool]:
  """Which calls are units: those of the model's own forward, or those matching."""
  if patterns is None:
    return lambda c: c.depth == 1
  patterns = tuple(patterns)
  return lambda c: _matches(c.path, patterns)


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


def _groups(calls: list[_Call], variables, is_unit: Callable[[_Call], bool]) -> list[_Group]:
  """Splits the recorded calls into units; checks every layer is supported."""
  counts = {}
  for c in calls:
    counts[c.path] = counts.get(c.path, 0) + 1
    if counts[c.path] == 2 and c.kind:
      raise UnsupportedModelError(f"layer {c.name!r} is called more than once; shared "
                                  "weights are not supported")
    if not c.kind and _own_params(variables, c.path):
      raise UnsupportedModelError(
          f"unsupported layer {c.name!r} of type {type(c.module).__name__}: supported "
          f"layers are {SUPPORTED_LAYERS} (plus parameter-free functions and modules such "
          "as relu, relu6, avg_pool, max_pool)")
  groups, current = [], None
  for i, c in enumerate(calls):
    inside = current is not None and c.path[:len(current[0])] == current[0]
    if inside:
      if c.kind:
        current[1].layers.append(c)
      continue
    current = None
    if is_unit(c):
      group = _Group(c.name.replace("/", "."), i, c.x, [])
      groups.append(group)
      current = (c.path, group)
      if c.kind:
        group.layers.append(c)
    elif c.kind:
      groups.append(_Group(c.name.replace("/", "."), i, c.x, [c]))
  return _merge_batchnorms(groups)


def _merge_batchnorms(groups: list[_Group]) -> list[_Group]:
  """Moves a group made only of BatchNorms into the group of the conv each one reads."""
  merged = []
  for g in groups:
    if g.layers and all(c.kind == "bn" for c in g.layers) and merged:
      prev = merged[-1]
      if all(any(c.x is p.out for p in prev.layers) for c in g.layers):
        prev.layers.extend(g.layers)
        continue
    if not g.layers:
      continue  # a parameter-free module: its effect is checked with the units around it
    merged.append(g)
  return merged


def _padding(conv, x_shape) -> list[tuple[int, int]]:
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
  if c.kind == "dense":
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


def _depthwise(c: _Call) -> bool:
  """Whether a recorded conv is depthwise (one group per input channel)."""
  groups = c.module.feature_group_count
  return groups > 1 and groups == c.x.shape[-1]


def _candidates(g: _Group, first: bool, last: bool) -> list[tuple[Unit, list[_Call]]]:
  """Possible unit structures for a group's weight layers (convs with BN folded in): every
  registered kind (``units.KINDS``) whose layer roles fit the group's layers in call
  order (a second conv reading the unit input is the shortcut; the kind's depthwise roles
  must be depthwise convs), with each of its shortcuts, activations and (where it may)
  max-pooling, in the kind's order of preference."""
  convs = [c for c in g.layers if c.kind == "conv"]
  dense = [c for c in g.layers if c.kind == "dense"]
  if dense and (convs or len(dense) > 1 or not last):
    raise UnsupportedModelError(
        f"dense layer {dense[0].name!r}: nn.Dense/nnx.Linear is supported only as the "
        "classifier, alone in the last unit after global average pooling")
  readers = [c for c in convs if c.x is g.x]
  shortcut = readers[1] if len(readers) > 1 else None
  main = dense or [c for c in convs if c is not shortcut]
  depthwise = {i for i, c in enumerate(main) if c.kind == "conv" and _depthwise(c)}
  out = []
  for kind in units.KINDS.values():
    for roles in kind.role_sets:
      main_roles = [r for r in roles if r != "shortcut"]
      required = {i for i, r in enumerate(main_roles) if r in kind.depthwise_roles}
      if (kind.dense != bool(dense) or len(main_roles) != len(main)
          or ("shortcut" in roles) != (shortcut is not None) or not required <= depthwise):
        continue
      layers = tuple(_layer(c, r) for c, r in zip(main, main_roles))
      ordered = list(main)
      shorts = tuple(s for s in kind.shortcuts if s != "conv")
      if shortcut is not None:
        layers += (_layer(shortcut, "shortcut"),)
        ordered.append(shortcut)
        shorts = ("conv",)
      acts = units.unit_acts(kind.name, roles, network_input=first)
      for act, short, pool in itertools.product(kind.activations, shorts,
                                                (False, True) if kind.maxpool else (False,)):
        unit = Unit(g.name, kind.name, layers, acts, shortcut=short, activation=act,
                    maxpool=pool)
        out.append((required != depthwise, unit, ordered))
  # Kinds that explain every depthwise conv first (stable: else in the kinds' order).
  out = [(unit, ordered) for _, unit, ordered in sorted(out, key=lambda t: t[0])]
  if not out:
    raise UnsupportedModelError(
        f"unit {g.name!r} has {len(convs)} convs ({', '.join(c.name for c in convs)}); "
        "supported: " + "; ".join(k.about for k in units.KINDS.values() if not k.dense))
  return out


def _fold_group(variables, g: _Group, layers: list[_Call], roles: Sequence[str]):
  """Folded ``{role: {'kernel', 'bias'}}`` and BN targets of a group's weight layers."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  bns = {id(c.x): c for c in g.layers if c.kind == "bn"}
  folded, targets = {}, {}
  for c, role in zip(layers, roles):
    p = fold.subtree(params, c.path)
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
    bp = fold.subtree(params, bn.path)
    ones = jnp.ones(p["kernel"].shape[-1])
    bn_params = {"scale": bp.get("scale", ones), "bias": bp.get("bias", 0 * ones)}
    k, b, t = fold.fold_bn(p["kernel"], bias, bn_params, fold.subtree(stats, bn.path), m.epsilon)
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


@functools.singledispatch
def read_model(model: nn.Module, variables, images, *,
               unit_patterns: Sequence[str] | None = None,
               apply_kwargs: dict | None = None) -> Network:
  """Folds a user's model into a ``Network`` of reconstruction units.

  ``read_model(model, variables, images)`` for a ``flax.linen`` Module,
  ``read_model(model, images)`` for a ``flax.nnx`` Module (it holds its variables; it is
  run as a copy and left unchanged). Everything else is the same for both.

  Args:
    model: a Module made of nn.Conv/nnx.Conv, nn.BatchNorm/nnx.BatchNorm,
      nn.Dense/nnx.Linear and parameter-free functions (relu, relu6, pooling, additions).
    variables: ``{'params', 'batch_stats'}`` of a linen model.
    images: float NHWC images the model accepts (the first ``VERIFY_SAMPLES`` are run).
    unit_patterns: '/'-separated module path patterns (fnmatch per segment) whose
      calls are reconstruction units, e.g. ``("stage*/block*",)`` or, for an NNX model
      with ``self.stages[i].blocks[j]``, ``("stages/*/blocks/*",)``. Default: the
      modules the model's own forward calls (its top-level submodules, including
      those in a list).
    apply_kwargs: extra keyword arguments of ``model.apply`` (linen) or of the model's
      call (NNX) for inference, e.g. ``{'train': False}``.
  Returns:
    The folded ``Network``; its forward equals the model's within ``RTOL``.
  Raises:
    UnsupportedModelError naming the module path of what cannot be read (for NNX, the
      attribute path such as ``blocks/0/norm``).
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"expected a flax.linen or flax.nnx Module, got {type(model).__name__}")
  apply_kwargs = dict(apply_kwargs or {})
  return _read(lambda x: _capture(model, variables, x, apply_kwargs), variables, images,
               unit_patterns)


@read_model.register
def _read_nnx_model(model: nnx.Module, images, *, unit_patterns: Sequence[str] | None = None,
                    apply_kwargs: dict | None = None) -> Network:
  """``read_model(model, images)`` for a ``flax.nnx`` Module (see ``read_model``)."""
  if isinstance(images, Mapping):
    raise TypeError("an nnx.Module holds its own variables: call read_model(model, images) "
                    "or quantize(model, images, cfg), without variables")
  apply_kwargs = dict(apply_kwargs or {})
  return _read(lambda x: _capture_nnx(model, x, apply_kwargs), _linen_layout(model), images,
               unit_patterns)


def _read(capture: Callable, variables, images, unit_patterns) -> Network:
  """``read_model`` after the framework's capture: ``capture(x) -> (calls, logits)``."""
  integrity.check_images(images, "calibration images")
  integrity.check_finite(variables, "model variables")
  x = jnp.asarray(images[:VERIFY_SAMPLES], jnp.float32)
  try:
    calls, logits = capture(x)
  except UnsupportedModelError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (flax shape errors are no ValueError)
    if images.shape[1] >= images.shape[-1]:
      raise  # the user's own forward failed on NHWC-looking images: its error as it is
    raise ValueError(f"the model cannot be applied to the calibration images of shape "
                     f"{tuple(images.shape)} ({type(e).__name__}: {str(e)[:300]}); images must "
                     f"be float NHWC (channels last); shape[1] = {images.shape[1]} looks like "
                     "channels-first (NCHW): transpose with x.transpose(0, 2, 3, 1)") from e
  groups = _groups(calls, variables, _is_unit(unit_patterns))
  # The same run on amplified images: reference tensors of every unit in both runs.
  loud_calls, loud_logits = capture(x * VERIFY_GAIN)
  refs = [(calls[g.index].x, loud_calls[g.index].x) for g in groups[1:]]
  refs.append((logits, loud_logits))
  if not groups:
    raise UnsupportedModelError("the model called no conv or dense layer (nn.Conv/nnx.Conv, "
                                "nn.Dense/nnx.Linear)")
  params, targets = {}, {}
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise UnsupportedModelError(f"unit names are not unique: {names}")
  hs = (x, x * VERIFY_GAIN)
  found, unclear = [], set()
  for i, g in enumerate(groups):
    tried = []
    candidates = _candidates(g, first=i == 0, last=i == len(groups) - 1)
    for unit, layers in candidates:
      p, t = _fold_group(variables, g, layers, [l.role for l in unit.layers])
      p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
      ys = _outputs_if_close(unit, p, hs, refs[i])
      if ys is not None:
        if unit.activation in _TWINS:
          twin = dataclasses.replace(unit, activation=_TWINS[unit.activation])
          if twin in [u for u, _ in candidates] and _outputs_if_close(twin, p, hs, refs[i]):
            unclear.add(i)
        found.append(unit)
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
  # Where the images never drive a unit above 6, ReLU and ReLU6 both fit: such a unit
  # takes the activation of the model's other units that have one (the most common).
  seen = collections.Counter(u.activation for i, u in enumerate(found)
                             if i not in unclear and u.activation in _TWINS)
  if seen:
    usual = seen.most_common(1)[0][0]
    found = [dataclasses.replace(u, activation=usual) if i in unclear else u
             for i, u in enumerate(found)]
  if found[-1].kind != "head":
    raise UnsupportedModelError(
        "the model must end in global average pooling and a dense classifier "
        f"(nn.Dense/nnx.Linear); its last unit {found[-1].name!r} is a {found[-1].kind}")
  return Network(tuple(found), params, targets)


def _outputs_if_close(unit: Unit, params: dict, inputs: tuple, refs: tuple) -> tuple | None:
  """The unit's outputs for each of ``inputs`` if they all match the model's tensors
  ``refs``, else None."""
  try:
    ys = tuple(unit_apply(unit, params, h)[0] for h in inputs)
  except TypeError:      # shapes that cannot be added: not this structure
    return None
  return ys if all(_close(y, r) for y, r in zip(ys, refs)) else None


@functools.singledispatch
def quantize(model: nn.Module, variables, calibration, cfg: PTQConfig | None = None, *,
             unit_patterns: Sequence[str] | None = None, apply_kwargs: dict | None = None,
             progress: bool = True, store: resume.Store | None = None) -> ptq.PTQResult:
  """Quantizes a user's model with power-of-two scales (RAPQ by default).

  ``quantize(model, variables, calibration, cfg)`` for a ``flax.linen`` Module,
  ``quantize(model, calibration, cfg)`` for a ``flax.nnx`` Module (left unchanged).

  Args:
    model, variables: the trained model (see ``read_model`` for what is supported).
    calibration: float32 [N, H, W, C] images preprocessed as the model expects.
    cfg: method settings (default ``rapq_jax.config.for_method('rapq')``).
    unit_patterns, apply_kwargs: see ``read_model``.
    store: ``rapq_jax.resume.Store``: finished units are saved there and a later call
      with the same store resumes after the last one (see ``ptq.quantize_network``).
  Returns:
    ``PTQResult``: ``apply(images) -> logits`` of the quantized model and its integer
    ``QuantizedModel``.
  """
  net = read_model(model, variables, calibration, unit_patterns=unit_patterns,
                   apply_kwargs=apply_kwargs)
  return _quantize_network(net, model, calibration, cfg, progress, store)


@quantize.register
def _quantize_nnx_model(model: nnx.Module, calibration, cfg: PTQConfig | None = None, *,
                        unit_patterns: Sequence[str] | None = None,
                        apply_kwargs: dict | None = None, progress: bool = True,
                        store: resume.Store | None = None) -> ptq.PTQResult:
  """``quantize(model, calibration, cfg)`` for a ``flax.nnx`` Module (see ``quantize``)."""
  net = read_model(model, calibration, unit_patterns=unit_patterns, apply_kwargs=apply_kwargs)
  return _quantize_network(net, model, calibration, cfg, progress, store)


def _quantize_network(net: Network, model, calibration, cfg, progress, store) -> ptq.PTQResult:
  return ptq.quantize_network(net, calibration, cfg or PTQConfig(), progress=progress,
                              store=store, metadata={"model": type(model).__name__,
                                                     "units": [u.name for u in net.units]})
