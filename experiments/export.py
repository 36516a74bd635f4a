r"""Exports the quantized models of a finished run.

  python -m experiments.export runs/cifar10_resnet20-20260101-120000 --format npz
  python -m experiments.export RUN_DIR --format onnx --out /tmp/exports

Reads every model ``experiments.run`` saved under ``RUN_DIR/models/<method>_w<W>a<A>/``
(orbax, see ``rapq_jax.export.save_model``) and writes, per model, into ``--out``
(default ``RUN_DIR/export``):

* ``npz``: ``<name>.npz`` + ``<name>.json``, the integer program and its manifest
  (docs/INTEGER.md), with the run's input shape and preprocessing added;
  ``python -m rapq_jax.reference_reader <name>.json images.npy`` runs it in numpy.
* ``onnx``: ``<name>.onnx``, the QDQ graph (float NHWC input ``image``, ``logits``).

Prints one line per file written.
"""
import argparse
import pathlib
import sys

from rapq_jax import export, integer

FORMATS = ("npz", "onnx")


def model_dirs(run_dir: pathlib.Path) -> list[pathlib.Path]:
  """Saved model directories of a run (orbax checkpoints), sorted by name."""
  root = run_dir / "models"
  return sorted(p for p in root.iterdir() if (p / "structure").exists()) if root.is_dir() else []


def export_run(run_dir, fmt: str, out_dir=None) -> list[pathlib.Path]:
  """Writes the exports of every saved model of ``run_dir``; returns the paths written.

  Raises:
    ValueError: unknown format, or a run directory without saved models.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
  run_dir = pathlib.Path(run_dir)
  dirs = model_dirs(run_dir)
  if not dirs:
    raise ValueError(f"{run_dir} has no saved models under models/ (runs save the "
                     "power-of-two model of each quantized method there)")
  out_dir = pathlib.Path(out_dir) if out_dir else run_dir / "export"
  written = []
  for d in dirs:
    program = integer.lower(export.load_model(d))
    extra = export.model_extra(d)
    if fmt == "npz":
      written += export.save_npz(program, out_dir / d.name, extra=extra)
    else:
      if "input_shape" not in extra:
        raise ValueError(f"{d} records no input shape; ONNX export needs one")
      written.append(export.save_onnx(program, out_dir / f"{d.name}.onnx", extra["input_shape"]))
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.export",
                                   description=__doc__.split("\n\n")[0].strip())
  parser.add_argument("run_dir", help="a finished experiments.run directory")
  parser.add_argument("--format", choices=FORMATS, default="npz")
  parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
  args = parser.parse_args(argv)
  try:
    paths = export_run(args.run_dir, args.format, args.out)
  except ValueError as err:
    parser.error(str(err))
  for p in paths:
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
