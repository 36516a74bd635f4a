"""BatchNorm folding: Flax model variables -> a folded ``Network`` of reconstruction units.

Folding a BN (scale ``g``, bias ``beta``, running ``mu``, ``v``) into the conv before it:
``w' = w * g / sqrt(v + eps)`` (per output channel, last axis) and
``b' = beta + (b - mu) * g / sqrt(v + eps)``. The folded output should then have per
channel mean ``beta`` and variance ``g**2 * v / (v + eps)``: kept as the BN targets.

Units follow the module naming of ``rapq_jax.models`` (Flax paths mirror PyTorch's):
CIFAR ResNets (``conv1``, ``layerS_I``, ``linear``), torchvision ResNets (``conv1`` with
max-pool, ``layerS_I`` with ``downsample_0/1``, ``fc``) and MobileNetV2 (``features_0``,
``features_K`` inverted residuals, ``features_18``, ``classifier_1``). The first block of
every stage after the first has stride 2.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax.models.mobilenetv2 import INVERTED_RESIDUAL_SETTING
from rapq_jax.network import Layer, Network, Unit, unit_acts

BN_EPS = 1e-5


def fold_bn(kernel, bias, bn_params, bn_stats, eps: float = BN_EPS):
  """Folds one BatchNorm into the preceding layer.

  Args:
    kernel: HWIO or [in, out] float; output channels last.
    bias: [out] or None.
    bn_params: {'scale', 'bias'}; bn_stats: {'mean', 'var'}, each [out].
  Returns:
    (kernel', bias', {'mean', 'var', 'gamma'}) with the folded output's BN targets.
  """
  g, beta = jnp.asarray(bn_params["scale"]), jnp.asarray(bn_params["bias"])
  mu, var = jnp.asarray(bn_stats["mean"]), jnp.asarray(bn_stats["var"])
  inv = g / jnp.sqrt(var + eps)
  b = jnp.zeros_like(mu) if bias is None else jnp.asarray(bias)
  targets = {"mean": beta, "var": g ** 2 * var / (var + eps), "gamma": g}
  return jnp.asarray(kernel) * inv, beta + (b - mu) * inv, targets


def _block_index(name: str) -> tuple[int, int]:
  stage, idx = re.fullmatch(r"layer(\d+)_(\d+)", name).groups()
  return int(stage), int(idx)


def _resnet_units(params) -> list[Unit]:
  cifar = "linear" in params
  blocks = sorted((k for k in params if k.startswith("layer")), key=_block_index)
  units = [Unit("conv1", "conv", (Layer("conv", "conv1", stride=1 if cifar else 2),),
                unit_acts("conv", ("conv",), network_input=True), maxpool=not cifar)]
  for name in blocks:
    stage, idx = _block_index(name)
    stride = 2 if stage > 1 and idx == 0 else 1
    p = params[name]
    bottleneck = "conv3" in p
    roles = ["conv1", "conv2"] + (["conv3"] if bottleneck else [])
    strided = "conv2" if bottleneck else "conv1"
    layers = [Layer(r, f"{name}/{r}", stride=stride if r == strided else 1) for r in roles]
    if "downsample_0" in p:
      layers.append(Layer("shortcut", f"{name}/downsample_0", stride=stride))
      shortcut = "conv"
    else:
      cin, cout = p["conv1"]["kernel"].shape[2], p[roles[-1]]["kernel"].shape[3]
      shortcut = "option_a" if (stride != 1 or cin != cout) else "identity"
    kind = "bottleneck" if bottleneck else "basic"
    units.append(Unit(name, kind, tuple(layers), unit_acts(kind, roles), shortcut=shortcut))
  head = "linear" if cifar else "fc"
  units.append(Unit(head, "head", (Layer("fc", head, dense=True),), unit_acts("head", ("fc",))))
  return units


def mobilenetv2_strides(settings=INVERTED_RESIDUAL_SETTING) -> list[int]:
  """Stride of each inverted residual block, in order, from (t, c, n, s) stages."""
  return [s if i == 0 else 1 for _, _, n, s in settings for i in range(n)]


def _mobilenet_units(params, block_strides) -> list[Unit]:
  blocks = sorted((k for k in params if re.fullmatch(r"features_\d+", k)),
                  key=lambda k: int(k.split("_")[1]))
  stem, last, inner = blocks[0], blocks[-1], blocks[1:-1]
  if len(inner) != len(block_strides):
    raise ValueError(f"MobileNetV2 has {len(inner)} inverted residual blocks but "
                     f"{len(block_strides)} strides were given")
  units = [Unit(stem, "conv", (Layer("conv", f"{stem}/0", stride=2),),
                unit_acts("conv", ("conv",), network_input=True), activation="relu6")]
  for name, stride in zip(inner, block_strides):
    p = params[name]
    expand = "conv_3" in p
    if expand:
      layers = [Layer("expand", f"{name}/conv_0_0"), Layer("dw", f"{name}/conv_1_0", stride=stride),
                Layer("project", f"{name}/conv_2")]
      dw_channels = p["conv_1_0"]["kernel"].shape[-1]
    else:
      layers = [Layer("dw", f"{name}/conv_0_0", stride=stride), Layer("project", f"{name}/conv_1")]
      dw_channels = p["conv_0_0"]["kernel"].shape[-1]
    layers = [Layer(l.role, l.path, l.stride, groups=dw_channels if l.role == "dw" else 1)
              for l in layers]
    cin = p["conv_0_0"]["kernel"].shape[2] if expand else dw_channels
    cout = subtree(params, layers[-1].path)["kernel"].shape[3]
    residual = stride == 1 and cin == cout
    units.append(Unit(name, "inverted", tuple(layers),
                      unit_acts("inverted", [l.role for l in layers]),
                      shortcut="identity" if residual else "none", activation="relu6"))
  units.append(Unit(last, "conv", (Layer("conv", f"{last}/0"),), unit_acts("conv", ("conv",)),
                    activation="relu6"))
  units.append(Unit("classifier_1", "head", (Layer("fc", "classifier_1", dense=True),),
                    unit_acts("head", ("fc",))))
  return units


def _bn_path(path: str) -> str:
  """Flax path of the BatchNorm that follows the layer at ``path``."""
  parent, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
  if re.fullmatch(r"conv\d", leaf):
    bn = "bn" + leaf[-1]
  elif leaf == "downsample_0":
    bn = "downsample_1"
  elif leaf == "0":
    bn = "1"
  elif leaf.endswith("_0"):          # MobileNetV2 conv_K_0 -> conv_K_1
    bn = leaf[:-1] + "1"
  else:                              # MobileNetV2 conv_K -> conv_{K+1}
    bn = f"conv_{int(leaf.split('_')[1]) + 1}"
  return f"{parent}/{bn}" if parent else bn


def subtree(tree, path):
  """``tree[k0][k1]...`` along ``path``: a sequence of keys or a '/'-separated string."""
  for part in path.split("/") if isinstance(path, str) else path:
    tree = tree[part]
  return tree


def build_network(variables, *, model=None, eps: float = BN_EPS) -> Network:
  """Folds every BN of a ``rapq_jax.models`` network and splits it into units.

  Args:
    variables: ``{'params', 'batch_stats'}`` of a CIFAR ResNet, torchvision
      ResNet-18/50 or MobileNetV2 from ``rapq_jax.models``.
    model: the Flax module the variables belong to; MobileNetV2 block strides are read
      from its ``setting`` (default: torchvision's table).
  Returns:
    The folded ``Network`` (float32 arrays).
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  if "classifier_1" in params:
    setting = getattr(model, "setting", None) or INVERTED_RESIDUAL_SETTING
    units = _mobilenet_units(params, mobilenetv2_strides(setting))
  elif "linear" in params or "fc" in params:
    units = _resnet_units(params)
  else:
    raise ValueError(f"cannot fold a network with top-level modules {sorted(params)}; "
                     "expected a CIFAR ResNet, torchvision ResNet or MobileNetV2 from "
                     "rapq_jax.models")
  folded, targets = {}, {}
  for unit in units:
    folded[unit.name], targets[unit.name] = {}, {}
    for layer in unit.layers:
      p = subtree(params, layer.path)
      if layer.dense:
        folded[unit.name][layer.role] = {"kernel": jnp.asarray(p["kernel"]),
                                         "bias": jnp.asarray(p["bias"])}
        continue
      bn = _bn_path(layer.path)
      k, b, t = fold_bn(p["kernel"], p.get("bias"), subtree(params, bn), subtree(stats, bn), eps)
      folded[unit.name][layer.role] = {"kernel": k, "bias": b}
      targets[unit.name][layer.role] = t
  to_f32 = lambda a: jnp.asarray(np.asarray(a), jnp.float32)
  return Network(tuple(units), jax.tree.map(to_f32, folded), jax.tree.map(to_f32, targets))
