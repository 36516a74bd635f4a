r"""Writes the Fashion-MNIST arrays that ship with the project (the default job's data).

  python -m experiments.embed_data                      # from Debian's IDX files
  python -m experiments.embed_data --data_dir DIR --out_dir experiments/checkpoints

The default job (`experiments/configs/fmnist_resnet.py`) reads two committed files, so a
machine with pip alone runs it:

- `fashion_mnist_train4000.npz`: its calibration pool, 400 training images of each class
  (the first 400 of each class in a permutation of the 60000 training images drawn with
  seed 0), shuffled with seed 0, so any prefix is nearly class-balanced;
- `fashion_mnist_test.npz`: the whole 10000-image test split, in its original order.

Both hold `images` uint8 [N, 28, 28, 1] and `labels` uint8 [N] (experiments.data.load_npz).
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence (FASHION_MNIST_LICENSE beside them);
`tests/test_embed_data.py` checks that the committed files are what this module writes.
"""
import pathlib

from absl import app
from absl import flags
import numpy as np

from experiments import data

PER_CLASS = 400
TRAIN_FILE, TEST_FILE = "fashion_mnist_train4000.npz", "fashion_mnist_test.npz"
OUT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoints"


def calibration_pool(images: np.ndarray, labels: np.ndarray, per_class: int = PER_CLASS,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` images of every label (the first of each in a seeded permutation),
  shuffled with the same seed.

  Returns:
    (images [10 * per_class, ...], labels [10 * per_class]).
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  chosen = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
  if len(chosen) != per_class * len(np.unique(labels)):
    raise ValueError(f"some class has fewer than {per_class} images")
  chosen = chosen[rng.permutation(len(chosen))]
  return images[chosen], labels[chosen]


def write(data_dir, out_dir) -> list[pathlib.Path]:
  """Writes TRAIN_FILE and TEST_FILE into `out_dir` from the IDX files in `data_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  train = calibration_pool(*data.load_fashion_mnist("train", data_dir))
  test = data.load_fashion_mnist("test", data_dir)
  paths = []
  for name, (images, labels) in ((TRAIN_FILE, train), (TEST_FILE, test)):
    paths.append(out_dir / name)
    np.savez_compressed(paths[-1], images=images, labels=labels.astype(np.uint8))
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for path in write(flags.FLAGS.data_dir, flags.FLAGS.out_dir):
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":  # flags defined only when run as a program, as in experiments.pretrain
  flags.DEFINE_string("data_dir", data.FASHION_MNIST_DIR,
                      "Directory of Debian's Fashion-MNIST IDX .gz files.")
  flags.DEFINE_string("out_dir", str(OUT_DIR), "Where to write the .npz files.")
  app.run(main)
