"""PyTorch-layout checkpoints <-> Flax variables of the ``rapq_jax.models`` networks.

A PyTorch state dict maps dotted module paths to tensors (conv weights OIHW,
depthwise [C, 1, kh, kw], linear [out, in], BN ``weight``/``bias``/``running_mean``/
``running_var``). ``convert_state_dict`` turns it into ``{'params', 'batch_stats'}``
of numpy float32 arrays (conv kernels HWIO, Dense kernels [in, out]) following the
naming rule of ``rapq_jax.models`` and checks every key and shape against the model;
``to_state_dict`` is its inverse.
"""
import hashlib
import os
import pathlib
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import integrity
from rapq_jax.models import get_model, input_shape

CACHE_DIR = pathlib.Path.home() / '.cache' / 'rapq_jax'
NUMPY_SUFFIXES = ('.npz',)
TORCH_SUFFIXES = ('.pth', '.th', '.pt', '.tar')
URL_SCHEMES = ('http', 'https', 'file')

# (Flax collection, Flax leaf name) -> PyTorch parameter/buffer name.
_TORCH_LEAF = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}

# BRECQ's MobileNetV2 numbers every layer of a block's ``conv`` Sequential (ReLU6
# included) where torchvision nests conv-BN-ReLU6 triples: torchvision -> BRECQ.
_BRECQ_FIRST_BLOCK = {'conv.0.0': 'conv.0', 'conv.0.1': 'conv.1', 'conv.1': 'conv.3',
                      'conv.2': 'conv.4'}
_BRECQ_BLOCK = {'conv.0.0': 'conv.0', 'conv.0.1': 'conv.1', 'conv.1.0': 'conv.3',
                'conv.1.1': 'conv.4', 'conv.2': 'conv.6', 'conv.3': 'conv.7'}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


# BRECQ's (pycls's) RegNet names the BNs of a block's transform ``f.a_bn``, ``f.b_bn``,
# ``f.c_bn``; the naming rule reads the Flax layer ``f_a_bn`` as ``f.a.bn``.
_BRECQ_REGNET_BN = {'f.a.bn': 'f.a_bn', 'f.b.bn': 'f.b_bn', 'f.c.bn': 'f.c_bn'}


def _brecq_key(model_name: str, key: str) -> str:
  """Naming-rule key -> key in a BRECQ release checkpoint.

  The rule's keys are torchvision's for the ResNets and MobileNetV2 and BRECQ's own for
  MnasNet; BRECQ's MobileNetV2 numbers its blocks' layers differently and its RegNets'
  BN names contain ``_`` (``s1.b1.f.a.bn.weight`` -> ``s1.b1.f.a_bn.weight``).
  """
  parts = key.split('.')
  if model_name.startswith('regnet'):
    layer = '.'.join(parts[2:-1])
    if layer not in _BRECQ_REGNET_BN:
      return key
    return '.'.join(parts[:2] + [_BRECQ_REGNET_BN[layer], parts[-1]])
  if model_name != 'mobilenetv2' or parts[0] != 'features' or parts[2] != 'conv':
    return key
  table = _BRECQ_FIRST_BLOCK if parts[1] == '1' else _BRECQ_BLOCK
  return '.'.join(['features', parts[1], table['.'.join(parts[2:-1])], parts[-1]])


SCHEMES: dict[str, Callable[[str, str], str]] = {
    'torchvision': lambda model_name, key: key,
    'brecq': _brecq_key,
}


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax shape -> PyTorch shape: HWIO -> OIHW, [in, out] -> [out, in], vectors as is."""
  if kind == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == 'kernel':
    return shape[::-1]
  return shape


def _relaid(kind: str, array, conv_axes: tuple[int, ...]) -> np.ndarray:
  """``array`` as float32, a kernel transposed (conv: ``conv_axes``; dense: reversed)."""
  array = np.asarray(array, dtype=np.float32)
  if kind != 'kernel':
    return array
  return np.ascontiguousarray(array.transpose(conv_axes) if array.ndim == 4 else array.T)


def _to_torch(kind: str, array) -> np.ndarray:
  """Flax array -> PyTorch float32 array: HWIO -> OIHW, [in, out] -> [out, in], vectors as is."""
  return _relaid(kind, array, (3, 2, 0, 1))


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
  """PyTorch array -> Flax float32 array (inverse of ``_to_torch``)."""
  return _relaid(kind, array, (2, 3, 1, 0))


def expected_layout(model: nn.Module, model_name: str,
                    scheme: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Checkpoint key -> (Flax path incl. collection and leaf, PyTorch shape) for ``model``."""
  if scheme not in SCHEMES:
    raise ValueError(f'unknown scheme {scheme!r}; expected one of {", ".join(SCHEMES)}')
  image = jax.ShapeDtypeStruct((1, *input_shape(model_name)), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(p.key for p in path)
    collection, *modules, kind = names
    key = '.'.join([m.replace('_', '.') for m in modules] + [_TORCH_LEAF[collection, kind]])
    layout[SCHEMES[scheme](model_name, key)] = (names, _torch_shape(kind, leaf.shape))
  return layout


def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside a ``{'model': ...}`` / ``{'state_dict': ...}`` wrapper, else itself."""
  for wrapper in ('state_dict', 'model'):
    if isinstance(checkpoint.get(wrapper), Mapping):
      return checkpoint[wrapper]
  return checkpoint


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model_name: str,
                       scheme: str = 'torchvision', num_classes: int | None = None) -> dict:
  """PyTorch state dict -> ``{'params': ..., 'batch_stats': ...}`` (numpy float32) for ``model_name``.

  Accepts a ``module.`` prefix and a ``{'model': ...}``/``{'state_dict': ...}`` wrapper,
  ignores ``num_batches_tracked``. ``scheme`` names the key layout: ``torchvision`` (also
  the CIFAR ResNets and BRECQ's ResNets) or ``brecq`` (BRECQ's releases: needed for its
  MobileNetV2 and RegNets; its ResNets and MnasNet read the same under either).
  Raises ``CheckpointError`` listing every missing, unexpected and mis-shaped key.
  """
  layout = expected_layout(get_model(model_name, num_classes), model_name, scheme)
  arrays = {k.removeprefix('module.'): v for k, v in _unwrap(state_dict).items()
            if not k.endswith('num_batches_tracked')}
  missing = sorted(k for k in layout if k not in arrays)
  unexpected = sorted(k for k in arrays if k not in layout)
  mis_shaped = [f'{k}: expected {layout[k][1]}, got {tuple(np.shape(v))}'
                for k, v in sorted(arrays.items())
                if k in layout and tuple(np.shape(v)) != layout[k][1]]
  if missing or unexpected or mis_shaped:
    lines = [f'checkpoint does not fit {model_name!r} (scheme {scheme!r}): {len(missing)} missing, '
             f'{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys']
    for title, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped', mis_shaped)):
      lines += [f'  {title} {k}' for k in keys]
    raise CheckpointError('\n'.join(lines))
  variables: dict = {}
  for key, (names, _) in layout.items():
    node = variables
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = _to_flax(names[-1], arrays[key])
  return variables


def to_state_dict(variables: Mapping[str, Any], model_name: str,
                  scheme: str = 'torchvision') -> dict[str, np.ndarray]:
  """``{'params', 'batch_stats'}`` of ``model_name`` -> PyTorch state dict of float32 arrays.

  The inverse of ``convert_state_dict``: conv kernels HWIO -> OIHW, Dense kernels
  [in, out] -> [out, in], BN ``scale``/``mean``/``var`` -> ``weight``/``running_mean``/
  ``running_var``; no ``num_batches_tracked``. Raises ``CheckpointError`` listing the
  variables that do not belong to ``model_name``'s layout.
  """
  arrays = {tuple(p.key for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  layout = expected_layout(get_model(model_name), model_name, scheme)
  expected = {names for names, _ in layout.values()}
  unknown = sorted('/'.join(names) for names in arrays if names not in expected)
  missing = sorted('/'.join(names) for names in expected if names not in arrays)
  if unknown or missing:
    raise CheckpointError(
        f'variables do not fit {model_name!r}: ' + ', '.join(
            [f'unexpected {n}' for n in unknown] + [f'missing {n}' for n in missing]))
  return {key: _to_torch(names[-1], arrays[names]) for key, (names, _) in layout.items()}


def _download(url: str, cache_dir: pathlib.Path) -> pathlib.Path:
  """Cached local copy of ``url``, written atomically (temp file + rename)."""
  name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
  target = cache_dir / f'{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}'
  if target.is_file():
    return target

  def fetch(f):
    with urllib.request.urlopen(url) as response:
      while chunk := response.read(1 << 20):
        f.write(chunk)

  return integrity.atomic_write(target, fetch)


def _torch_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Tensors of a ``torch.save``d state dict (possibly wrapped) as numpy arrays."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: pip install rapq-jax[torch]') from e
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise CheckpointError(f'cannot read checkpoint {path}: {e}') from e
  state_dict = _unwrap(checkpoint) if isinstance(checkpoint, Mapping) else None
  if state_dict is None or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
    raise CheckpointError(f'{path} holds no state dict of tensors')
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def load_state_dict(path: str | os.PathLike,
                    cache_dir: str | os.PathLike = CACHE_DIR) -> dict[str, np.ndarray]:
  """Checkpoint file (``.npz``, or ``.pth``/``.th``/``.pt``/``.tar`` with PyTorch) or URL -> arrays.

  URLs (http, https, file) are downloaded once into ``cache_dir``. Keys are returned
  as stored (wrapper removed, prefixes kept). Raises ``FileNotFoundError`` for a missing
  file and ``CheckpointError`` for an unreadable one.
  """
  if urllib.parse.urlparse(str(path)).scheme in URL_SCHEMES:
    path = _download(str(path), pathlib.Path(cache_dir))
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if path.suffix in TORCH_SUFFIXES:
    return _torch_state_dict(path)
  if path.suffix not in NUMPY_SUFFIXES:
    raise CheckpointError(f'unsupported checkpoint suffix {path.suffix!r} of {path}; '
                          f'expected one of {", ".join(NUMPY_SUFFIXES + TORCH_SUFFIXES)}')
  try:
    with np.load(path) as archive:
      return {k: archive[k] for k in archive.files}
  except Exception as e:
    raise CheckpointError(f'cannot read checkpoint {path}: {e}') from e


def load_pretrained(path_or_url: str | os.PathLike, model_name: str, scheme: str = 'torchvision',
                    num_classes: int | None = None) -> tuple[nn.Module, dict]:
  """``(get_model(model_name), variables)`` for a checkpoint file or URL; see ``convert_state_dict``."""
  state_dict = load_state_dict(path_or_url)
  try:   # a NaN weight would otherwise quantize to a silently wrong model
    integrity.check_finite(_unwrap(state_dict), f'checkpoint {path_or_url}')
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  variables = convert_state_dict(state_dict, model_name, scheme, num_classes)
  return get_model(model_name, num_classes), variables
