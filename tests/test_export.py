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
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import onnx          # pinned in requirements.txt: a missing one fails, never skips
import onnxruntime as ort
import pytest

from experiments import methods, pipeline
from experiments import export as export_cli
from rapq_jax import config, export, fold, integer, ptq, quantized
from rapq_jax import reference_reader as reader
from rapq_jax.models import get_model
from test_integer import load_config, quantize_tiny, random_variables

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NETS = ("resnet-naive", "mobilenet-naive")


@pytest.fixture(scope="module")
def nets():
  """name -> (QuantizedModel, images, Program), each quantized once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      result, x, _ = quantize_tiny(*name.split("-"))
      cache[name] = (result.model, x, integer.lower(result.model))
    return cache[name]

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


def test_reader_rejects_a_manifest_that_does_not_match(nets, tmp_path):
  _, _, program = nets("resnet-naive")
  _, man = export.save_npz(program, tmp_path / "m")
  spec = json.loads(man.read_text())
  spec["arrays"]["linear/fc/q"]["shape"] = [1, 2]
  man.write_text(json.dumps(spec))
  with pytest.raises(ValueError, match="linear/fc/q"):
    reader.load(tmp_path / "m")


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


@pytest.mark.slow
def test_torchvision_resnet18_integer_onnx_and_reader(tmp_path):
  """The ImageNet ResNet-18 layout (max-pooled stem, 1x1 conv shortcuts), random and
  naive PoT at 32x32: simulation, integer path, reader and ONNX agree exactly."""
  model = get_model("resnet18")
  net = fold.build_network(random_variables(model, 32), model=model)
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


@pytest.mark.slow
def test_run_method_saves_a_model_that_exports(fashion_mnist_dir, tmp_path):
  """A real run (Fashion-MNIST ResNet, naive PoT) saves its model; the integer path of
  the saved model predicts exactly what the run evaluated, and both exports work."""
  config = load_config("fmnist_resnet")
  config.dataset.data_dir = str(fashion_mnist_dir)
  config.calibration_size, config.test_size = 64, 200
  data = pipeline.load_data(config)
  record = methods.run_method(config, data, "naive", progress=False, save_dir=tmp_path / "models")
  qm = export.load_model(tmp_path / "models" / "naive_w4a4")
  assert qm.info["method"] == "naive"
  extra = export.model_extra(tmp_path / "models" / "naive_w4a4")
  assert extra["input_shape"] == [28, 28, 1] and len(extra["preprocess"]["mean"]) == 1
  program = integer.lower(qm)
  assert program.spec["checks"]["exact_float32"]
  x = data.preprocess(data.test_images)
  logits = jax.jit(integer.apply)(program, x)
  np.testing.assert_array_equal(logits, quantized.apply(qm, x))
  hits = int(np.sum(np.argmax(np.asarray(logits), -1) == data.test_labels))
  assert 100.0 * hits / len(data.test_labels) == record["top1"]
  written = export_cli.export_run(tmp_path, "onnx") + export_cli.export_run(tmp_path, "npz")
  assert [p.name for p in written] == ["naive_w4a4.onnx", "naive_w4a4.npz", "naive_w4a4.json"]
  # The benchmark's onnxruntime check, here on the run's 200 test images.
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  figures = export_cli.check_onnx(tmp_path, written[:1])["naive_w4a4"]
  assert figures["n"] == 200 and figures["top1_simulation"] == record["top1"]
  assert figures["no_optimization"] == {"top1": record["top1"], "agreement": 100.0,
                                        "max_abs_logit_diff": 0.0}
  assert figures["default_optimization"]["agreement"] >= 99.0

