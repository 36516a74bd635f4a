"""Input pipelines: dataset loaders, host-side preprocessing, training batches, calibration sampling.

Every loader returns (images uint8 [N, H, W, C] NHWC, labels int32 [N]); the
preprocessing functions map uint8 pixels to the float32 inputs the models expect.
"""
import gzip
import os
import struct
from typing import Iterator

import numpy as np
from PIL import Image

CIFAR_MEAN = IMAGENET_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Debian's dataset-fashion-mnist IDX files; RAPQ_FASHION_MNIST_DIR points elsewhere.
FASHION_MNIST_DIR = os.environ.get("RAPQ_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
TFDS_NAMES = ("cifar10", "fashion_mnist", "imagenet2012")

_IDX_IMAGES_MAGIC = 0x00000803  # ubyte, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # ubyte, 1 dim
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


def check_images(images, *, channels=None) -> None:
  """Raises ValueError unless `images` is [N, H, W, C] uint8 or finite float.

  Args:
    images: array to check.
    channels: required C, or None for any.
  """
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"images must be a 4-D [N, H, W, C] array; got shape {shape}")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float; got dtype {images.dtype}")
  if channels is not None and shape[3] != channels:
    raise ValueError(f"images must have {channels} channels (NHWC); got shape {shape}")
  if images.dtype != np.uint8 and not np.all(np.isfinite(images)):
    bad = np.asarray(images)[~np.isfinite(images)][0]
    raise ValueError(f"images must be finite; got {bad}")


def _check_labels(labels, n: int, source: str) -> np.ndarray:
  """labels as int32 [n]; ValueError naming `source` otherwise."""
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{source}: labels must be integers of shape ({n},); got {labels.dtype} {labels.shape}")
  return labels.astype(np.int32)


def load_npz(path) -> tuple[np.ndarray, np.ndarray]:
  """Reads `images` uint8 [N, H, W, C] and `labels` int [N] from an .npz file.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz dataset {path} not found")
  with np.load(path) as npz:
    missing = [key for key in ("images", "labels") if key not in npz.files]
    if missing:
      raise ValueError(
          f"{path} lacks {missing}; expected arrays 'images' uint8 [N, H, W, C] and "
          f"'labels' int [N], found {npz.files}")
    images, labels = npz["images"], npz["labels"]
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: images must be uint8; got dtype {images.dtype}")
  try:
    check_images(images)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return images, _check_labels(labels, images.shape[0], str(path))


def read_idx(path, magic: int) -> np.ndarray:
  """uint8 array from a gzipped IDX file whose magic number must equal `magic`.

  The IDX header is a big-endian uint32 magic (0x0000, dtype code 0x08 for ubyte,
  number of dims) followed by one big-endian uint32 per dim.
  """
  with gzip.open(path, "rb") as f:
    data = f.read()
  if data[:4] != struct.pack(">I", magic):
    found = data[:4].hex() or "missing"
    raise ValueError(f"{path}: IDX magic number {found}, expected {magic:08x}")
  header = 4 + 4 * (magic & 0xFF)
  if len(data) < header:
    raise ValueError(f"{path}: {len(data)} bytes is shorter than the {header}-byte IDX header")
  dims = list(struct.unpack(f">{(header - 4) // 4}I", data[4:header]))
  size = int(np.prod(dims))
  if len(data) != header + size:
    raise ValueError(
        f"{path}: IDX header declares dims {dims} ({size} bytes) but the file holds "
        f"{len(data) - header} bytes after the header")
  return np.frombuffer(bytearray(data), np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str, root=FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST from the original IDX .gz files.

  Args:
    split: 'train' (60000 images) or 'test' (10000 images).
    root: directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.

  Returns:
    (images uint8 [N, 28, 28, 1], labels int32 [N] in 0..9).
  """
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(
        f"Fashion-MNIST split must be one of {list(_FASHION_MNIST_FILES)}; got {split!r}")
  prefix = os.path.join(root, _FASHION_MNIST_FILES[split])
  paths = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"Fashion-MNIST file {path} not found; install it with "
          "`apt-get install -y dataset-fashion-mnist` or use TFDS `fashion_mnist` (load_tfds)")
  images = read_idx(paths[0], _IDX_IMAGES_MAGIC)
  labels = read_idx(paths[1], _IDX_LABELS_MAGIC)
  if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
    raise ValueError(
        f"{prefix}-*: expected images [N, 28, 28] and labels [N]; "
        f"got {images.shape}, {labels.shape}")
  if np.any(labels > 9):
    raise ValueError(f"{paths[1]}: labels must lie in 0..9; got {labels.max()}")
  return images[..., None], labels.astype(np.int32)


def _import_tfds():
  """tensorflow_datasets, after checking that tensorflow is importable too."""
  try:
    import tensorflow  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"load_tfds needs tensorflow and tensorflow-datasets ({e}); "
        "install them with `pip install rapq-jax[tfds]`") from e
  return tfds


def load_tfds(name: str, split: str, *, data_dir=None, manual_dir=None,
              image_size=None) -> tuple[np.ndarray, np.ndarray]:
  """A whole TFDS split, decoded into memory.

  Needs tensorflow and tensorflow-datasets (`pip install rapq-jax[tfds]`); cifar10
  and fashion_mnist download on first use (network access), imagenet2012 needs
  the ILSVRC2012 train/val tars in `manual_dir`. At 224 px the 50000 ImageNet
  validation images take 7.5 GB of host memory.

  Args:
    name: one of TFDS_NAMES.
    split: TFDS split, slices allowed ('validation', 'train[:10000]').
    data_dir: TFDS data directory (TFDS default when None).
    manual_dir: directory with the manually downloaded archives (imagenet2012).
    image_size: if set, resize the shorter side to image_size * 256 / 224 and
      center-crop image_size x image_size (the ImageNet eval transform);
      required for imagenet2012, whose images vary in size.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]).
  """
  if name not in TFDS_NAMES:
    raise ValueError(f"TFDS dataset must be one of {list(TFDS_NAMES)}; got {name!r}")
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty TFDS split string; got {split!r}")
  if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
    raise ValueError(f"image_size must be a positive int or None; got {image_size!r}")
  if name == "imagenet2012" and image_size is None:
    raise ValueError("imagenet2012 images vary in size; pass image_size (224 for the eval crop)")
  tfds = _import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  n = builder.info.splits[split].num_examples
  labels = np.empty(n, np.int32)
  images = None
  dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  for i, (image, label) in enumerate(tfds.as_numpy(dataset)):
    if image_size is not None:
      image = resize_center_crop(image, resize=image_size * 256 // 224, crop=image_size)
    if images is None:
      images = np.empty((n,) + image.shape, np.uint8)
    images[i], labels[i] = image, label
  return images, labels


def normalize(images, mean, std) -> np.ndarray:
  """float32 (images / 255 - mean) / std per channel (last axis), any leading shape."""
  images = np.asarray(images)
  if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
    raise ValueError(
        f"mean/std need one value per channel: {len(mean)}/{len(std)} values for images "
        f"of shape {images.shape} (channels last)")
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (images.astype(np.float32) / 255.0 - mean) / std


def resize_center_crop(image, *, resize: int = 256, crop: int = 224) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [crop, crop, C], as torchvision Resize(resize) + CenterCrop(crop).

  The shorter side becomes `resize` (PIL bilinear, antialiased when shrinking),
  the longer side int(resize * long / short); then the central crop is taken.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, C]; got {image.dtype} {image.shape}")
  if crop > resize:
    raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
  h, w, c = image.shape
  short, long = min(h, w), max(h, w)
  new_long = int(resize * long / short)
  size = (resize, new_long) if w <= h else (new_long, resize)  # PIL takes (width, height)
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  out = np.asarray(pil.resize(size, Image.Resampling.BILINEAR)).reshape(size[1], size[0], c)
  top = int(round((size[1] - crop) / 2.0))
  left = int(round((size[0] - crop) / 2.0))
  return out[top:top + crop, left:left + crop]


def train_batches(images, labels, batch_size: int, rng: np.random.Generator, *, mean,
                  std) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of normalized batches in an order drawn from `rng`; the last partial batch is dropped.

  Args:
    images: uint8 [N, H, W, C].
    labels: int32 [N].
    batch_size: images per batch, 1..N.
    rng: draws one permutation of 0..N-1 per call.
    mean, std: per-channel normalization (see `normalize`).

  Yields:
    (float32 [batch_size, H, W, C], int32 [batch_size]).
  """
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if not 0 < batch_size <= len(images):
    raise ValueError(f"batch_size={batch_size} must lie in 1..{len(images)} (the number of images)")
  order = rng.permutation(len(images))
  for start in range(0, len(images) - batch_size + 1, batch_size):
    index = order[start:start + batch_size]
    yield normalize(images[index], mean, std), labels[index]


def calibration_sample(images, labels, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` distinct (image, label) pairs drawn by a seeded permutation.

  Returns:
    (images [n, ...], labels [n]) in permutation order.
  """
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if not 0 < n <= len(images):
    raise ValueError(f"calibration size n={n} must lie in 1..{len(images)} (the number of images)")
  index = np.random.default_rng(seed).permutation(len(images))[:n]
  return images[index], labels[index]
