"""Records the logits of BRECQ's own PyTorch RegNetX-600MF, RegNetX-3.2GF and MnasNet.

For each model: builds it with BRECQ's constructor (``models.regnet.regnetx_600m``,
``models.regnet.regnetx_3200m``, ``models.mnasnet.mnasnet``, as its ``hubconf.py`` does:
no arguments, so MnasNet has BRECQ's default scale 2.0), fills every state-dict entry
with ``zoo_weights.state_dict_for`` (numpy, seeded, in state-dict order), runs the two
``zoo_weights.images`` in eval mode and writes ``zoo_<name>.npz`` holding only

- ``logits``: float32 [2, 1000];
- ``seed``: the weight seed (images use ``seed + zoo_weights.IMAGE_SEED_OFFSET``);
- ``keys``: the state-dict keys in order; ``shapes``: int64 [len(keys), 4], each key's
  shape padded with -1 (num_batches_tracked has shape ());
- ``branch_end``: the ``zoo_weights.BRANCH_END_BN`` pattern the weights were drawn with;
- ``source``: BRECQ's commit and the constructor that built the model.

No weights are stored: ``tests/test_zoo.py`` regenerates them from ``seed`` and the keys.

Run with a Python that has torch (BRECQ's models import it), e.g.::

  git -C <BRECQ clone> archive e455d62e93c70351961f8991c913b59435bd165f | tar -x -C /tmp/brecq
  python tests/reference/make_zoo_logits.py --brecq-dir /tmp/brecq
"""
import argparse
import importlib
import re
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import zoo_weights  # noqa: E402  (beside this script)

BRECQ_COMMIT = 'e455d62e93c70351961f8991c913b59435bd165f'
# our model name -> (BRECQ module, constructor, weight seed)
MODELS = {
    'regnetx_600m': ('models.regnet', 'regnetx_600m', 600),
    'regnetx_3200m': ('models.regnet', 'regnetx_3200m', 3200),
    'mnasnet': ('models.mnasnet', 'mnasnet', 2),
}


def padded_shapes(shapes) -> np.ndarray:
  """Shapes (rank <= 4) -> int64 [n, 4], padded with -1."""
  out = np.full((len(shapes), 4), -1, np.int64)
  for i, shape in enumerate(shapes):
    out[i, :len(shape)] = shape
  return out


def record(name: str, out_dir: pathlib.Path) -> pathlib.Path:
  module_name, constructor, seed = MODELS[name]
  model = getattr(importlib.import_module(module_name), constructor)()
  keys_shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  branch_end = zoo_weights.BRANCH_END_BN[name]
  arrays = zoo_weights.state_dict_for(keys_shapes, seed, branch_end)
  small = [k for k in arrays if re.search(branch_end, k)]
  assert small, f'{branch_end!r} matches no key of {name}'
  model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
  model.eval()
  images = zoo_weights.images(seed)
  with torch.no_grad():
    logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert logits.shape == (zoo_weights.NUM_IMAGES, 1000) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  path = out_dir / f'zoo_{name}.npz'
  np.savez_compressed(
      path, logits=logits, seed=np.int64(seed),
      keys=np.array([k for k, _ in keys_shapes]),
      shapes=padded_shapes([s for _, s in keys_shapes]), branch_end=np.array(branch_end),
      source=np.array(f'yhhhli/BRECQ@{BRECQ_COMMIT} {module_name}.{constructor}()'))
  print(f'{name}: {len(keys_shapes)} keys ({len(small)} branch-end BN weights), '
        f'logits std {logits.std():.3f}, '
        f'max |logit| {np.abs(logits).max():.3f}, image difference '
        f'{np.abs(logits[0] - logits[1]).max():.3f} -> {path} ({path.stat().st_size} bytes)')
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--brecq-dir', required=True, type=pathlib.Path,
                      help=f'checkout of github.com/yhhhli/BRECQ (commit {BRECQ_COMMIT})')
  parser.add_argument('--out-dir', type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parent)
  parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
  args = parser.parse_args()
  sys.path.insert(0, str(args.brecq_dir.resolve()))
  torch.manual_seed(0)   # nothing random is drawn from torch; BRECQ's init is overwritten
  for name in args.models:
    record(name, args.out_dir)


if __name__ == '__main__':
  main()
