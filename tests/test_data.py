"""Specification of experiments.data: loaders, preprocessing, calibration sampling, checks."""
import gzip
import struct
import sys

import chex
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from experiments import data


def write_idx(path, array, magic):
  """Writes uint8 `array` as a gzipped IDX file with the given magic number."""
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())


# Fashion-MNIST (IDX files)

@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_dtypes_and_labels(fashion_mnist_dir, split, n):
  images, labels = data.load_fashion_mnist(split, fashion_mnist_dir)
  chex.assert_shape(images, (n, 28, 28, 1))
  chex.assert_shape(labels, (n,))
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, n // 10))
  assert images.max() == 255


def test_read_idx_parses_header_and_data(tmp_path):
  array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  write_idx(tmp_path / "x.gz", array, 0x0803)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz", 0x0803), array)


@pytest.mark.parametrize("content,found", [
    (struct.pack(">2I", 0x0801, 1) + b"\0", "00000801"),
    (struct.pack(">I", 0x0D03) + b"\0" * 16, "00000d03"),
    (b"", "missing"),
])
def test_read_idx_rejects_wrong_magic(tmp_path, content, found):
  with gzip.open(tmp_path / "x.gz", "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match=rf"x\.gz.*magic number {found}, expected 00000803"):
    data.read_idx(tmp_path / "x.gz", 0x0803)


@pytest.mark.parametrize("extra", [b"", b"\0\0"])
def test_read_idx_rejects_size_mismatch(tmp_path, extra):
  with gzip.open(tmp_path / "x.gz", "wb") as f:
    f.write(struct.pack(">2I", 0x0801, 4) + b"\1\2\3" + extra)
  with pytest.raises(ValueError, match=r"dims \[4\] \(4 bytes\)"):
    data.read_idx(tmp_path / "x.gz", 0x0801)


def test_load_fashion_mnist_reads_synthetic_files(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x0803)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), 0x0801)
  got_images, got_labels = data.load_fashion_mnist("test", tmp_path)
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, np.arange(6))


def test_load_fashion_mnist_rejects_image_label_count_mismatch(tmp_path):
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), 0x0803)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8), 0x0801)
  with pytest.raises(ValueError, match=r"\(3, 28, 28\), \(2,\)"):
    data.load_fashion_mnist("test", tmp_path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*fashion_mnist"):
    data.load_fashion_mnist("train", tmp_path / "absent")


def test_fashion_mnist_rejects_unknown_split():
  with pytest.raises(ValueError, match=r"\['train', 'test'\].*'validation'"):
    data.load_fashion_mnist("validation")


# .npz datasets

def test_load_npz_round_trip(tmp_path):
  images = np.zeros((3, 4, 4, 3), np.uint8)
  np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 9, 3], np.uint8))
  got_images, labels = data.load_npz(tmp_path / "d.npz")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(labels, [0, 9, 3])
  assert labels.dtype == np.int32


def test_load_npz_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothere\.npz"):
    data.load_npz(tmp_path / "nothere.npz")


@pytest.mark.parametrize("arrays,match", [
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8)), r"d\.npz lacks \['labels'\].*found \['images'\]"),
    (dict(x=np.zeros(2), labels=np.zeros(2, int)), r"d\.npz lacks \['images'\]"),
    (dict(images=np.zeros((2, 4, 4, 3), np.float32), labels=np.zeros(2, int)), r"d\.npz.*uint8.*float32"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, int)), r"d\.npz.*4-D.*\(2, 4, 4\)"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, int)), r"d\.npz.*\(2,\).*\(3,\)"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2)), r"d\.npz.*integers.*float64"),
])
def test_load_npz_rejects_bad_content(tmp_path, arrays, match):
  np.savez(tmp_path / "d.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    data.load_npz(tmp_path / "d.npz")


# TFDS (only what runs without tensorflow and network)

@pytest.mark.parametrize("name,split,kwargs,match", [
    ("mnist", "test", {}, r"\['cifar10', 'fashion_mnist', 'imagenet2012'\].*'mnist'"),
    ("cifar10", "", {}, r"non-empty.*''"),
    ("cifar10", "test", {"image_size": 0}, r"positive int.*0"),
    ("cifar10", "test", {"image_size": 22.4}, r"positive int.*22\.4"),
    ("imagenet2012", "validation", {}, r"vary in size; pass image_size"),
])
def test_load_tfds_validates_arguments(name, split, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_tfds(name, split, **kwargs)


def test_load_tfds_without_tensorflow_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(ImportError, match=r"pip install rapq-jax\[tfds\]"):
    data.load_tfds("cifar10", "test")


# Preprocessing

def test_normalize_per_channel():
  images = np.array([0, 255, 51], np.uint8).reshape(1, 1, 1, 3)
  expected = (np.array([0.0, 1.0, 0.2]) - np.array(data.CIFAR_MEAN)) / np.array(data.CIFAR_STD)
  out = data.normalize(images, data.CIFAR_MEAN, data.CIFAR_STD)
  chex.assert_type(out, np.float32)
  chex.assert_trees_all_close(out.reshape(3), expected.astype(np.float32), rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4).map(lambda s: s + (1,))))
def test_normalize_inverts_to_unit_range(images):
  out = data.normalize(images, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
  restored = out * data.FASHION_MNIST_STD[0] + data.FASHION_MNIST_MEAN[0]
  np.testing.assert_allclose(restored, images / 255.0, atol=1e-6)


def test_normalize_rejects_channel_mismatch():
  with pytest.raises(ValueError, match=r"3/3 values.*\(2, 4, 4, 1\)"):
    data.normalize(np.zeros((2, 4, 4, 1), np.uint8), data.IMAGENET_MEAN, data.IMAGENET_STD)


@pytest.mark.parametrize("height,width", [(300, 400), (400, 300), (256, 256), (64, 80)])
@pytest.mark.parametrize("resize,crop", [(256, 224), (32, 32)])
def test_resize_center_crop_shape(height, width, resize, crop):
  out = data.resize_center_crop(np.zeros((height, width, 3), np.uint8), resize=resize, crop=crop)
  chex.assert_shape(out, (crop, crop, 3))
  assert out.dtype == np.uint8


@pytest.mark.parametrize("image,kwargs,match", [
    (np.zeros((8, 8, 3), np.float32), {}, r"uint8 \[H, W, C\].*float32"),
    (np.zeros((1, 8, 8, 3), np.uint8), {}, r"uint8 \[H, W, C\].*\(1, 8, 8, 3\)"),
    (np.zeros((8, 8, 3), np.uint8), {"resize": 32, "crop": 40}, r"crop \(40\).*resize \(32\)"),
])
def test_resize_center_crop_rejects(image, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.resize_center_crop(image, **kwargs)


@pytest.mark.parametrize("height,width", [(320, 480), (480, 320), (300, 300)])
def test_center_crop_keeps_a_centered_patch_centered(height, width):
  image = np.zeros((height, width, 3), np.uint8)
  top, left = height // 2 - 32, width // 2 - 32
  image[top:top + 64, left:left + 64] = 255
  out = data.resize_center_crop(image)[..., 0].astype(np.float64)
  rows, cols = np.indices(out.shape)
  centroid = (np.sum(rows * out) / out.sum(), np.sum(cols * out) / out.sum())
  chex.assert_trees_all_close(centroid, (111.5, 111.5), atol=0.5)
  assert out[0].max() == out[:, 0].max() == 0  # the patch is well inside the crop


def test_resize_center_crop_grayscale():
  chex.assert_shape(data.resize_center_crop(np.zeros((30, 40, 1), np.uint8), resize=28, crop=28),
                    (28, 28, 1))


# Calibration sample

def test_calibration_sample_is_seeded_and_keeps_pairs():
  images = np.arange(50).reshape(50, 1, 1, 1).astype(np.uint8)
  labels = np.arange(50, dtype=np.int32)
  a_images, a_labels = data.calibration_sample(images, labels, 20, seed=1005)
  b_images, b_labels = data.calibration_sample(images, labels, 20, seed=1005)
  c_images, _ = data.calibration_sample(images, labels, 20, seed=1)
  np.testing.assert_array_equal(a_images, b_images)
  np.testing.assert_array_equal(a_labels, b_labels)
  assert not np.array_equal(a_images, c_images)
  np.testing.assert_array_equal(a_images.reshape(-1), a_labels)
  assert len(np.unique(a_labels)) == 20


@pytest.mark.parametrize("n", [0, -3, 51])
def test_calibration_sample_rejects_bad_size(n):
  with pytest.raises(ValueError, match=rf"n={n} must lie in 1\.\.50"):
    data.calibration_sample(np.zeros((50, 1, 1, 1)), np.zeros(50), n, seed=0)


def test_calibration_sample_rejects_unequal_lengths():
  with pytest.raises(ValueError, match="50 images but 49 labels"):
    data.calibration_sample(np.zeros((50, 1, 1, 1)), np.zeros(49), 10, seed=0)


# check_images

def test_check_images_accepts_uint8_and_finite_float():
  data.check_images(np.zeros((2, 4, 4, 3), np.uint8), channels=3)
  data.check_images(np.zeros((2, 4, 4, 1), np.float32))


@pytest.mark.parametrize("images,channels,match", [
    (np.zeros((4, 4, 3), np.uint8), None, r"4-D.*\(4, 4, 3\)"),
    (np.zeros((1, 2, 4, 4, 3), np.uint8), None, r"4-D.*\(1, 2, 4, 4, 3\)"),
    (np.zeros((2, 4, 4, 1), np.uint8), 3, r"3 channels.*\(2, 4, 4, 1\)"),
    (np.zeros((2, 4, 4, 3), np.int32), None, r"uint8 or float.*int32"),
    (np.zeros((2, 4, 4, 3), bool), None, r"uint8 or float.*bool"),
    (np.array([0.0, np.nan, 1.0, 2.0]).reshape(1, 2, 2, 1), None, r"finite.*nan"),
    (np.array([0.0, np.inf, 1.0, 2.0]).reshape(1, 2, 2, 1), None, r"finite.*inf"),
    ([[[[0]]]], None, r"4-D.*None"),
])
def test_check_images_rejects(images, channels, match):
  with pytest.raises(ValueError, match=match):
    data.check_images(images, channels=channels)
