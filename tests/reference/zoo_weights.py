"""Deterministic weights and images for the BRECQ model-zoo reference logits (numpy only).

``make_zoo_logits.py`` fills a BRECQ PyTorch model's state dict with ``state_dict_for``
and records its logits on ``images``; ``tests/test_zoo.py`` rebuilds the same arrays from
the recorded seed and key list, so no weights are stored. The arrays depend only on the
seed and on the (key, shape) list in state-dict order:

- conv weight [O, I/groups, kh, kw]: N(0, 2 / fan_in), fan_in = I/groups * kh * kw (He);
- linear weight [O, I]: N(0, 1 / I); linear bias: N(0, 0.1^2);
- BN weight U(0.8, 1.2), bias N(0, 0.1^2), running_mean N(0, 0.1^2), running_var
  U(0.5, 2.0); num_batches_tracked: int64 0;
- except the weight of a BN that ends a residual branch (keys matching the model's
  ``BRANCH_END_BN`` pattern): U(0.2, 0.4). He-scaled convs keep a branch's output about
  as large as its input, so with weights near 1 every residual addition would double the
  variance (2**15 over RegNetX-3.2GF's third stage); at 0.2 .. 0.4 a block adds under
  10 % and the logits stay O(1 .. 10).

A BN's ``weight`` and ``bias`` are told from a linear layer's by their neighbours: a BN
``weight`` is a vector whose key prefix also has a ``running_var``.
"""
import re
from collections.abc import Sequence

import numpy as np

# model name -> regex of the BN weights that end a residual branch: every RegNet block's
# ``f.c_bn``; MnasNet's blocks 1.. of a stack (block 0 changes the shape, no residual).
BRANCH_END_BN = {
    'regnetx_600m': r'^s\d+\.b\d+\.f\.c_bn\.weight$',
    'regnetx_3200m': r'^s\d+\.b\d+\.f\.c_bn\.weight$',
    'mnasnet': r'^layers\.\d+\.[1-9]\d*\.layers\.7\.weight$',
}
IMAGE_SEED_OFFSET = 1_000_003   # images come from seed + this offset, weights from seed
NUM_IMAGES = 2
IMAGE_SIZE = 224


def state_dict_for(keys_shapes: Sequence[tuple[str, Sequence[int]]], seed: int,
                   branch_end: str | None = None) -> dict[str, np.ndarray]:
  """(key, shape) pairs in state-dict order -> arrays drawn in that order from ``seed``;
  ``branch_end``: regex of the BN weights drawn small (``BRANCH_END_BN[name]``)."""
  rng = np.random.default_rng(seed)
  prefixes_with_stats = {k.rsplit('.', 1)[0] for k, _ in keys_shapes if k.endswith('.running_var')}
  arrays = {}
  for key, shape in keys_shapes:
    shape = tuple(int(s) for s in shape)
    prefix, leaf = key.rsplit('.', 1)
    bn = prefix in prefixes_with_stats
    if leaf == 'num_batches_tracked':
      array = np.zeros(shape, np.int64)
    elif leaf == 'running_var':
      array = rng.uniform(0.5, 2.0, shape)
    elif leaf == 'running_mean' or leaf == 'bias':
      array = 0.1 * rng.standard_normal(shape)
    elif leaf == 'weight' and bn and branch_end and re.search(branch_end, key):
      array = rng.uniform(0.2, 0.4, shape)
    elif leaf == 'weight' and bn:
      array = rng.uniform(0.8, 1.2, shape)
    elif leaf == 'weight' and len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      array = np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
    elif leaf == 'weight' and len(shape) == 2:
      array = np.sqrt(1.0 / shape[1]) * rng.standard_normal(shape)
    else:
      raise ValueError(f'no rule for {key} {shape}')
    arrays[key] = array if array.dtype == np.int64 else array.astype(np.float32)
  return arrays


def images(seed: int) -> np.ndarray:
  """NHWC float32 [2, 224, 224, 3]: per image a coarse N(0, 1) pattern (8x8 cells of
  28x28 pixels) plus N(0, 0.5^2) pixel noise, so that the two images' logits differ by
  more than white noise's would after global pooling. NCHW for PyTorch: transpose."""
  rng = np.random.default_rng(seed + IMAGE_SEED_OFFSET)
  cell = IMAGE_SIZE // 8
  coarse = rng.standard_normal((NUM_IMAGES, 8, 8, 3))
  coarse = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)
  noise = 0.5 * rng.standard_normal((NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3))
  return (coarse + noise).astype(np.float32)
