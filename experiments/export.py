r"""Exports the quantized models of a finished run.

  python -m experiments.export runs/cifar10_resnet20-20260101-120000 --format npz
  python -m experiments.export RUN_DIR --format onnx --out /tmp/exports
  python -m experiments.export RUN_DIR --format onnx --check      # + onnxruntime vs simulation

Reads every model ``experiments.run`` saved under ``RUN_DIR/models/<method>_w<W>a<A>/``
(orbax, see ``rapq_jax.export.save_model``) and writes, per model, into ``--out``
(default ``RUN_DIR/export``):

* ``npz``: ``<name>.npz`` + ``<name>.json``, the integer program and its manifest
  (docs/INTEGER.md), with the run's input shape and preprocessing added;
  ``python -m rapq_jax.reference_reader <name>.json images.npy`` runs it in numpy.
* ``onnx``: ``<name>.onnx``, the QDQ graph (float NHWC input ``image``, ``logits``).

Prints one line per file written. ``--check`` (ONNX only) then runs every exported model
in onnxruntime on the run config's test split, with graph optimizations off (the graph's
own semantics) and at ORT's default level (which fuses QDQ pairs into integer kernels
with their own rounding), and compares with the fake-quant simulation: top-1 of each,
the share of images with the same prediction, the largest logit difference. The figures
go to ``<out>/onnx_check.json``.
"""
import argparse
import json
import pathlib
import sys

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from experiments import pipeline
from rapq_jax import export, integer, integrity, quantized

FORMATS = ("npz", "onnx")


def model_dirs(run_dir: pathlib.Path) -> list[pathlib.Path]:
  """Saved model directories of a run (orbax checkpoints), sorted by name."""
  root = run_dir / "models"
  return sorted(p for p in root.iterdir() if (p / "structure").exists()) if root.is_dir() else []


def export_run(run_dir, fmt: str, out_dir=None) -> list[pathlib.Path]:
  """Writes the exports of every saved model of ``run_dir``; returns the paths written.

  Raises:
    ValueError: unknown format, a run directory without saved models, or a damaged
      model (``integrity.IntegrityError``, naming it; nothing is written then).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
  run_dir = pathlib.Path(run_dir)
  dirs = model_dirs(run_dir)
  if not dirs:
    raise ValueError(f"{run_dir} has no saved models under models/ (runs save the "
                     "power-of-two model of each quantized method there)")
  out_dir = pathlib.Path(out_dir) if out_dir else run_dir / "export"
  # Every model is read (and its checksums verified) before anything is written.
  loaded = [(d, integer.lower(export.load_model(d)), export.model_extra(d)) for d in dirs]
  written = []
  for d, program, extra in loaded:
    if fmt == "npz":
      written += export.save_npz(program, out_dir / d.name, extra=extra)
    else:
      if "input_shape" not in extra:
        raise ValueError(f"{d} records no input shape; ONNX export needs one")
      written.append(export.save_onnx(program, out_dir / f"{d.name}.onnx", extra["input_shape"]))
  return written


def _sessions(path: pathlib.Path) -> dict:
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  out = {}
  for name, level in (("no_optimization", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                      ("default_optimization", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    out[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
  return out


def check_onnx(run_dir, onnx_paths: list[pathlib.Path], *, test_size: int | None = None,
               batch: int = 500) -> dict:
  """onnxruntime vs simulation on the run's test split, per exported model.

  Returns ``{model: {'n', 'top1_simulation', ..., '<level>': {'top1', 'agreement',
  'max_abs_logit_diff'}}}`` (top-1 and agreement in percent).
  """
  run_dir = pathlib.Path(run_dir)
  config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
  if test_size is not None:
    config.test_size = test_size
  data = pipeline.load_data(config)
  labels = data.test_labels
  figures = {}
  for path in onnx_paths:
    qm = export.load_model(run_dir / "models" / path.stem)
    sessions = _sessions(path)
    sim, ort_out = [], {k: [] for k in sessions}
    for i in tqdm(range(0, len(labels), batch), desc=f"onnx check {path.stem}",
                  disable=None):
      x = np.asarray(data.preprocess(data.test_images[i:i + batch]), np.float32)
      sim.append(np.asarray(quantized.apply(qm, x)))
      for k, session in sessions.items():
        ort_out[k].append(session.run(["logits"], {"image": x})[0])
    sim = np.concatenate(sim)
    entry = {"n": int(len(labels)), "top1_simulation": float(np.mean(sim.argmax(-1) == labels) * 100)}
    for k, outs in ort_out.items():
      logits = np.concatenate(outs)
      entry[k] = {"top1": float(np.mean(logits.argmax(-1) == labels) * 100),
                  "agreement": float(np.mean(logits.argmax(-1) == sim.argmax(-1)) * 100),
                  "max_abs_logit_diff": float(np.max(np.abs(logits - sim)))}
    figures[path.stem] = entry
  return figures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.export",
                                   description=__doc__.split("\n\n")[0].strip())
  parser.add_argument("run_dir", help="a finished experiments.run directory")
  parser.add_argument("--format", choices=FORMATS, default="npz")
  parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
  parser.add_argument("--check", action="store_true",
                      help="ONNX only: compare onnxruntime with the simulation on the test split")
  parser.add_argument("--test_size", type=int, default=None,
                      help="--check on the first N test images only (default: all)")
  args = parser.parse_args(argv)
  if args.check and args.format != "onnx":
    parser.error(f"--check needs --format onnx, got --format {args.format}")
  try:
    paths = export_run(args.run_dir, args.format, args.out)
  except ValueError as err:
    parser.error(str(err))
  for p in paths:
    print(p)
  if args.check:
    figures = check_onnx(args.run_dir, paths, test_size=args.test_size)
    out = paths[0].parent / "onnx_check.json"
    integrity.atomic_write(out, json.dumps(figures, indent=1))
    for name, f in figures.items():
      print(f"{name}: simulation top-1 {f['top1_simulation']:.2f} % on {f['n']} images; " + "; ".join(
          f"onnxruntime {k.replace('_', ' ')}: top-1 {f[k]['top1']:.2f} %, agreement "
          f"{f[k]['agreement']:.2f} %, max |logit diff| {f[k]['max_abs_logit_diff']:.3g}"
          for k in ("no_optimization", "default_optimization")))
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
