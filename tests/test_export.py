"""Specification of rapq_jax.export, rapq_jax.reference_reader and experiments.export.

A saved model (orbax) loads back identical; the npz + JSON export describes the whole
integer program (op graph, bit widths, rounding, every array's dtype and shape) and the
numpy reference reader, which imports no JAX, reproduces the JAX integer path bit for
bit; the ONNX QDQ graph has power-of-two scales and integer zero points and, run by
onnxruntime without graph rewrites, gives the integer path's logits exactly.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import onnx          # pinned in requirements.txt: a missing one fails, never skips
import onnxruntime as ort
import pytest

import damage
from experiments import methods, pipeline
from experiments import export as export_cli
from rapq_jax import config, export, integer, integrity, ptq, quantized
from rapq_jax import reference_reader as reader
from rapq_jax.models import BasicBlock, ResNet
from test_integer import folded, load_config, quantize_tiny, random_variables

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NETS = ("resnet-naive", "mobilenet-naive")


@pytest.fixture(scope="module")
def nets():
  """name -> (QuantizedModel, images, Program), each quantized once per module;
  ``nets.result(name)`` is its PTQResult."""
  cache, results = {}, {}

  def get(name):
    if name not in cache:
      results[name], x, _ = quantize_tiny(*name.split("-"))
      cache[name] = (results[name].model, x, integer.lower(results[name].model))
    return cache[name]

  get.result = lambda name: (get(name), results[name])[1]
  return get


# ------------------------------------------------------------------ orbax

def test_orbax_roundtrip(nets, tmp_path):
  qm, x, _ = nets("resnet-naive")
  path = export.save_model(qm, tmp_path / "model", extra={"input_shape": [16, 16, 3]})
  back = export.load_model(path)
  assert back.units == qm.units and back.bits == qm.bits and back.metadata == qm.metadata
  chex.assert_trees_all_equal(back.weights, qm.weights)
  chex.assert_trees_all_equal(back.acts, qm.acts)
  chex.assert_trees_all_equal_dtypes(back.weights, qm.weights)
  assert export.model_extra(path) == {"input_shape": [16, 16, 3]}
  np.testing.assert_array_equal(quantized.apply(back, x), quantized.apply(qm, x))
  export.save_model(qm, path)                    # overwrites in place
  assert export.model_extra(path) == {}


def _model_tree(directory):
  qm = export.load_model(directory)
  return {"weights": qm.weights, "acts": qm.acts, "units": repr(qm.units), "bits": repr(qm.bits),
          "metadata": qm.metadata, "extra": json.dumps(export.model_extra(directory))}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see damage.py
def test_every_flip_in_a_saved_model_is_detected_or_harmless(nets, tmp_path):
  qm, _, _ = nets("resnet-naive")
  path = export.save_model(qm, tmp_path / "model", extra={"input_shape": [16, 16, 3]})
  seen = damage.assert_every_flip_detected_or_harmless(path, _model_tree, _model_tree(path))
  assert "detected" in seen


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see damage.py
def test_damaged_model_is_not_exported(nets, tmp_path, capsys):
  """One flipped bit in a saved model's array data: experiments.export names the model
  and writes nothing."""
  qm, _, _ = nets("resnet-naive")
  path = export.save_model(qm, tmp_path / "run" / "models" / "naive_w4a4")
  data = damage.largest_file(path / "arrays" / "d")
  damage.flip(data, data.stat().st_size // 2, 3)
  with pytest.raises(SystemExit):
    export_cli.main([str(tmp_path / "run"), "--format", "npz"])
  assert re.search(r"naive_w4a4: (checksum mismatch|cannot be read)", capsys.readouterr().err)
  assert not (tmp_path / "run" / "export").exists()


# ------------------------------------------------------------------ npz + manifest

@pytest.mark.parametrize("name", NETS)
def test_npz_roundtrip_and_manifest(nets, name, tmp_path):
  _, x, program = nets(name)
  npz, man = export.save_npz(program, tmp_path / "m", extra={"input_shape": [3, 3, 3]})
  assert (npz.name, man.name) == ("m.npz", "m.json")
  spec = json.loads(man.read_text())
  assert spec["format"] == integer.FORMAT and spec["version"] == integer.VERSION
  assert set(spec["rounding"]) == {"input", "bias", "requantize", "add", "avgpool"}
  assert "half_up" in spec["rounding"]["requantize"]
  with np.load(npz) as data:
    assert sorted(data.files) == sorted(spec["arrays"])
    for k in data.files:
      assert data[k].dtype.str == spec["arrays"][k]["dtype"]
      assert list(data[k].shape) == spec["arrays"][k]["shape"]
      assert np.issubdtype(data[k].dtype, np.integer), k
  for op in spec["ops"]:                         # every name an op uses is an array or tensor
    for key in ("weight", "zero_point", "bias", "shift", "shift_a", "shift_b"):
      if key in op:
        assert op[key] in spec["arrays"]
    for t in (op["in"] if isinstance(op["in"], list) else [op["in"]]):
      assert t in spec["tensors"]
  for t, info in spec["tensors"].items():
    assert info["exp"] in spec["arrays"]
    if "bits" in info:
      assert 2 <= info["bits"] <= 8 and info["min"] < info["max"]
  back = export.load_npz(tmp_path / "m")
  assert back.spec == program.spec
  chex.assert_trees_all_equal(back.arrays, program.arrays)
  np.testing.assert_array_equal(integer.apply(back, x), integer.apply(program, x))


@pytest.mark.parametrize("name", NETS)
def test_reference_reader_matches_integer_path(nets, name, tmp_path):
  _, x, program = nets(name)
  export.save_npz(program, tmp_path / "m")
  manifest, arrays = reader.load(tmp_path / "m")
  x_np = np.asarray(x)
  q = reader.quantize_input(manifest, arrays, x_np)
  np.testing.assert_array_equal(q, integer.quantize_input(program, x))
  acc = reader.run(manifest, arrays, q)
  assert acc.dtype == np.int32
  np.testing.assert_array_equal(acc, integer.run(program, integer.quantize_input(program, x)))
  np.testing.assert_array_equal(reader.apply(manifest, arrays, x_np), integer.apply(program, x))


def test_reference_reader_runs_without_jax(nets, tmp_path):
  """In a fresh interpreter where importing jax fails, the reader's CLI runs the export
  and predicts what the JAX integer path predicts."""
  _, x, program = nets("resnet-naive")
  export.save_npz(program, tmp_path / "m")
  np.save(tmp_path / "x.npy", np.asarray(x))
  code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None; "
          "import runpy; sys.argv = ['reader', sys.argv[1], sys.argv[2]]; "
          "runpy.run_module('rapq_jax.reference_reader', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.json"),
                         str(tmp_path / "x.npy")], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert proc.returncode == 0, proc.stderr
  predictions = json.loads(proc.stdout)["predictions"]
  assert predictions == np.argmax(integer.apply(program, x), -1).tolist()


def _rewrite(stem: pathlib.Path, spec_fn=None, arrays_fn=None, *, describe: bool = True):
  """Rewrites the export at ``stem`` changed by ``spec_fn`` / ``arrays_fn``, with valid
  checksums (and, if ``describe``, array entries): a file that is exactly what its
  manifest says, so only the format's own checks can refuse it."""
  spec = json.loads(stem.with_suffix(".json").read_text())
  with np.load(stem.with_suffix(".npz")) as f:
    arrays = {k: f[k] for k in f.files}
  (arrays_fn or (lambda a: None))(arrays)
  (spec_fn or (lambda s: None))(spec)
  if describe:
    spec["arrays"] = {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()}
  spec["checksums"] = {"arrays": integrity.digests(arrays), "manifest": reader.manifest_digest(spec)}
  np.savez(stem.with_suffix(".npz"), **arrays)
  stem.with_suffix(".json").write_text(json.dumps(spec))


def _set_array(name, index, value):
  def change(arrays):
    arrays[name] = arrays[name].copy()
    arrays[name][index] = value
  return change


def test_reader_rejects_a_manifest_that_does_not_match(nets, tmp_path):
  _, _, program = nets("resnet-naive")
  export.save_npz(program, tmp_path / "m")
  _rewrite(tmp_path / "m", lambda spec: spec["arrays"]["linear/fc/q"].update(shape=[1, 2]),
           describe=False)
  with pytest.raises(ValueError, match="linear/fc/q"):
    reader.load(tmp_path / "m")


@pytest.mark.parametrize("name, index, value, message", [
    ("layer1_0/conv1/q", (0, 0, 0, 0), 255, r"holds 255, outside the 4-bit weight bound \[0, 15\]"),
    ("layer1_0/@relu1/shift", 0, 70, r"holds 70, outside the shift bound \[-30, 30\]"),
    ("layer1_0/@relu1/shift", 0, -40, r"holds -40, outside the shift bound \[-30, 30\]"),
    ("conv1/@input/exp", (), 200, r"holds 200, outside the exponent bound \[-32, 31\]"),
])
def test_out_of_bounds_exports_are_refused_on_load(nets, tmp_path, name, index, value, message):
  """A file whose checksums match but whose integers break the format's bounds: the
  reader and ``export.load_npz`` name the array and the bound."""
  _, _, program = nets("resnet-naive")
  export.save_npz(program, tmp_path / "m")
  _rewrite(tmp_path / "m", arrays_fn=_set_array(name, index, value))
  for load in (reader.load, export.load_npz):
    with pytest.raises(ValueError, match=rf"m.json: op \d+ .*array '{name}' {message}|"
                                         rf"m.json: array '{name}' {message}"):
      load(tmp_path / "m")


def _first_conv(key, value):
  return lambda spec: next(op for op in spec["ops"] if op["op"] == "conv").update({key: value})


def _drop(name):
  def spec_fn(spec):
    del spec["arrays"][name]
  return spec_fn


@pytest.mark.parametrize("change, message", [
    (lambda m: m.with_suffix(".json").write_text("{bad"), r"m.json: not valid JSON \(Expecting"),
    (lambda m: m.with_suffix(".json").write_text("[1, 2]"), "m.json: expected a JSON object"),
    (lambda m: _rewrite(m, _drop("layer1_0/conv1/bias"), lambda a: a.pop("layer1_0/conv1/bias"),
                        describe=False),
     r"op \d+ \(conv -> 'layer1_0/conv1'\): array 'layer1_0/conv1/bias' is missing"),
    (lambda m: _rewrite(m, lambda spec: spec["ops"][1].update(op="winograd")),
     "m.json: op 1: unknown op 'winograd'; known: conv"),
    (lambda m: _rewrite(m, _first_conv("stride", 0)), r"stride = 0: expected an integer >= 1"),
    (lambda m: m.with_suffix(".npz").write_bytes(b"PK\x03\x04 not a zip"), r"m.npz: cannot be read"),
    (lambda m: damage.flip(m.with_suffix(".json"), 40), r"m.json: (checksum mismatch|not valid)"),
])
def test_reader_cli_names_what_is_wrong_in_one_line(nets, tmp_path, change, message):
  _, x, program = nets("resnet-naive")
  export.save_npz(program, tmp_path / "m")
  np.save(tmp_path / "x.npy", np.asarray(x))
  change(tmp_path / "m")
  with pytest.raises(SystemExit) as exit_:
    reader.main(["reader", str(tmp_path / "m.json"), str(tmp_path / "x.npy")])
  text = str(exit_.value.code)
  assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text


def test_images_of_the_wrong_kind_are_refused(nets, tmp_path):
  """Integer pixels, NaN pixels: an error from the reader and from ``result.apply``,
  not finite but meaningless logits."""
  _, x, program = nets("resnet-naive")
  result = nets.result("resnet-naive")
  export.save_npz(program, tmp_path / "m")
  manifest, arrays = reader.load(tmp_path / "m")
  x = np.asarray(x)
  nan = x.copy()
  nan[5, 3, 2, 1] = np.nan
  pixels = np.clip(x * 50 + 128, 0, 255)
  for images, message in ((pixels.astype(np.uint8), r"integer pixels \(dtype uint8\)"),
                          (pixels.astype(np.int32), r"integer pixels \(dtype int32\)"),
                          (nan, r"image 5 has a non-finite value nan at pixel \(h=3, w=2, c=1\)"),
                          (x.transpose(0, 3, 1, 2), "NCHW")):
    with pytest.raises(ValueError, match=message):
      reader.apply(manifest, arrays, images)
    with pytest.raises(ValueError, match=message):
      result.apply(images)
  assert np.all(np.isfinite(result.apply(x))) and result.apply(x).shape == (len(x), 10)


def test_every_flip_in_an_npz_export_is_detected_or_harmless(nets, tmp_path):
  _, _, program = nets("resnet-naive")
  export.save_npz(program, tmp_path / "export" / "m")
  reference = reader.load(tmp_path / "export" / "m")
  seen = damage.assert_every_flip_detected_or_harmless(
      tmp_path / "export", lambda copy: reader.load(copy / "m"), reference)
  assert "detected" in seen


# ------------------------------------------------------------------ ONNX

def onnx_logits(program, x):
  """Logits of the ONNX export run by onnxruntime without graph rewrites."""
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(export.to_onnx(program, x.shape[1:]).SerializeToString(),
                                 options, providers=["CPUExecutionProvider"])
  return session.run(["logits"], {"image": np.asarray(x)})[0]


@pytest.mark.parametrize("name, hw", [("resnet-naive", None), ("resnet-naive", 4),
                                      ("resnet-naive", 8), ("mobilenet-naive", None)])
def test_onnx_qdq_matches_integer_path(nets, name, hw):
  """Pools over 16 (and 1, 4: other input sizes) and 9 positions."""
  _, x, program = nets(name)
  if hw is not None:
    x = jax.random.normal(jax.random.PRNGKey(2), (8, hw, hw, 3), jnp.float32)
  model = export.to_onnx(program, x.shape[1:])
  ops = [n.op_type for n in model.graph.node]
  assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= set(ops)
  inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
  for node in model.graph.node:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
      scale, zp = inits[node.input[1]], inits[node.input[2]]
      mantissa, _ = np.frexp(scale)
      assert scale.dtype == np.float32 and np.all(mantissa == 0.5), node.name   # 2**e
      assert np.issubdtype(zp.dtype, np.integer), node.name
  np.testing.assert_array_equal(onnx_logits(program, x), integer.apply(program, x))


@pytest.mark.slow(seconds=25)
def test_torchvision_resnet_integer_onnx_and_reader(tmp_path):
  """The layout of torchvision's ImageNet ResNets (max-pooled stem, 1x1 conv shortcuts),
  one basic block per stage at ResNet-18's widths, random and naive PoT at 32x32:
  simulation, integer path, reader and ONNX agree exactly."""
  model = ResNet((1, 1, 1, 1), BasicBlock, num_classes=10)
  net = folded(model, random_variables(model, 32), 32)
  calib = jax.random.normal(jax.random.PRNGKey(0), (16, 32, 32, 3), jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3), jnp.float32)
  qm = ptq.quantize_network(net, calib, config.for_method("naive"), progress=False).model
  program = integer.lower(qm)
  kinds = {op["op"] for op in program.spec["ops"]}
  assert {"maxpool", "add", "avgpool"} <= kinds
  logits = integer.apply(program, x)
  np.testing.assert_array_equal(logits, quantized.apply(qm, x))
  export.save_npz(program, tmp_path / "m")
  np.testing.assert_array_equal(reader.apply(*reader.load(tmp_path / "m"), np.asarray(x)), logits)
  np.testing.assert_array_equal(onnx_logits(program, x), logits)


# ------------------------------------------------------------------ experiments.export

def test_export_cli_writes_npz_and_onnx(nets, tmp_path, capsys):
  qm, x, program = nets("resnet-naive")
  run_dir = tmp_path / "run"
  export.save_model(qm, run_dir / "models" / "naive_w4a4",
                    extra={"input_shape": list(x.shape[1:]),
                           "preprocess": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}})
  assert export_cli.main([str(run_dir), "--format", "npz"]) == 0
  assert export_cli.main([str(run_dir), "--format", "onnx"]) == 0
  printed = capsys.readouterr().out.split()
  assert [pathlib.Path(p).name for p in printed] == ["naive_w4a4.npz", "naive_w4a4.json",
                                                     "naive_w4a4.onnx"]
  spec = json.loads((run_dir / "export" / "naive_w4a4.json").read_text())
  assert spec["input_shape"] == [16, 16, 3] and spec["preprocess"]["mean"] == [0.5] * 3
  back = export.load_npz(run_dir / "export" / "naive_w4a4")
  np.testing.assert_array_equal(integer.apply(back, x), integer.apply(program, x))
  assert (run_dir / "export" / "naive_w4a4.onnx").stat().st_size > 0


def test_export_cli_without_models_fails(tmp_path, capsys):
  with pytest.raises(SystemExit):
    export_cli.main([str(tmp_path), "--format", "npz"])
  assert "no saved models" in capsys.readouterr().err


@pytest.mark.slow(seconds=25)
def test_run_method_saves_a_model_that_exports(tmp_path):
  """A real run (Fashion-MNIST ResNet, naive PoT) saves its model; the integer path of
  the saved model predicts exactly what the run evaluated, and both exports work."""
  config = load_config("fmnist_resnet")
  config.calibration_size, config.test_size = 32, 100
  data = pipeline.load_data(config)
  record = methods.run_method(config, data, "naive", progress=False, save_dir=tmp_path / "models")
  assert record["align"] == {"mode": "none", "factors": {}}   # naive: the folded network
  qm = export.load_model(tmp_path / "models" / "naive_w4a4")
  assert qm.info["method"] == "naive"
  extra = export.model_extra(tmp_path / "models" / "naive_w4a4")
  assert extra["input_shape"] == [28, 28, 1] and len(extra["preprocess"]["mean"]) == 1
  program = integer.lower(qm)
  assert program.spec["checks"]["exact_float32"]
  x = data.preprocess(data.test_images)
  logits = integer.apply(program, x)
  np.testing.assert_array_equal(logits, quantized.apply(qm, x))
  hits = int(np.sum(np.argmax(np.asarray(logits), -1) == data.test_labels))
  assert 100.0 * hits / len(data.test_labels) == record["top1"]
  written = export_cli.export_run(tmp_path, "onnx") + export_cli.export_run(tmp_path, "npz")
  assert [p.name for p in written] == ["naive_w4a4.onnx", "naive_w4a4.npz", "naive_w4a4.json"]
  # The benchmark's onnxruntime check, here on the run's 100 test images.
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  figures = export_cli.check_onnx(tmp_path, written[:1])["naive_w4a4"]
  assert figures["n"] == 100 and figures["top1_simulation"] == record["top1"]
  assert figures["no_optimization"] == {"top1": record["top1"], "agreement": 100.0,
                                        "max_abs_logit_diff": 0.0}
  assert figures["default_optimization"]["agreement"] >= 99.0

