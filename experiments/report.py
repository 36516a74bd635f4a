"""Run outputs: checked result records, the results table, plots and the environment
record (versions, machine, commit) of every experiment output."""
import collections
import json
import os
import pathlib
import platform
import subprocess

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402

from rapq_jax import integrity  # noqa: E402


def as_written(record: dict) -> dict:
  """``record`` as ``write_record`` writes it and ``read_record`` returns it (JSON types)."""
  return json.loads(json.dumps(record, default=float))


def write_record(path: pathlib.Path, record: dict) -> dict:
  """Writes ``record`` as JSON with the sha256 of its canonical form (key ``sha256``),
  atomically; returns the record as ``read_record`` will return it."""
  record = as_written(record)
  integrity.atomic_write(path, json.dumps({**record, "sha256": integrity.json_digest(record)}, indent=1))
  return record


def read_record(path: pathlib.Path) -> dict:
  """The record ``write_record`` wrote at ``path``; ``integrity.IntegrityError`` naming
  the file if it is not valid JSON, lacks its checksum or differs from it."""
  try:
    record = json.loads(pathlib.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as err:
    raise integrity.IntegrityError(f"{path}: not valid JSON ({err})") from None
  digest = record.pop("sha256", None) if isinstance(record, dict) else None
  if digest != integrity.json_digest(record):
    raise integrity.IntegrityError(f"{path}: checksum mismatch (or none): the file is damaged")
  return record


_CACHE_EVENTS = "/jax/compilation_cache/"
_cache_counts = collections.Counter()


def _count_cache_event(event: str, **_) -> None:
  if event.startswith(_CACHE_EVENTS):
    _cache_counts[event[len(_CACHE_EVENTS):]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def cache_lookups() -> dict:
  """How many compilations of this process the persistent compilation cache has served
  (``hits``) and not served (``misses``: compiled, then stored if slow enough) so far."""
  return dict(hits=_cache_counts["cache_hits"], misses=_cache_counts["cache_misses"])


def compilation_cache() -> dict:
  """JAX's persistent compilation cache: its directory (None: off) and how many compiled
  programs it held (0: every program of the run was compiled, a cold start)."""
  directory = jax.config.jax_compilation_cache_dir
  entries = (sum(1 for p in pathlib.Path(directory).glob("*-cache"))
             if directory and os.path.isdir(directory) else 0)
  return dict(dir=directory, entries=entries)


def environment() -> dict:
  """Versions, machine, git commit and the compilation cache's state: what is needed to
  rerun a result and to read its timings."""
  import flax
  import jaxlib
  import optax

  repo = pathlib.Path(__file__).resolve().parents[1]
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=repo, capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = None, None
  return dict(
      versions=dict(python=platform.python_version(), jax=jax.__version__,
                    jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
                    numpy=np.__version__),
      machine=dict(platform=platform.platform(), processor=platform.machine(),
                   cpu_count=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                   device_kind=jax.devices()[0].device_kind,
                   matmul_precision=jax.config.jax_default_matmul_precision or "default"),
      git=dict(commit=commit, dirty=dirty),
      compilation_cache=compilation_cache(),
  )


def bits_label(r: dict) -> str:
  """'FP32' or 'W4A4' for a result row."""
  return "FP32" if r["wbits"] is None else f"W{r['wbits']}A{r['abits']}"


def results_table(results: list[dict]) -> str:
  """Markdown table, one row per method and bit width: top-1, drop from FP, the top-1
  agreement with FP and the mean KL(FP || quantized) on the test images (records made
  before they were measured leave them blank), whether every scale is a power of two,
  wall time and mean seconds per iteration."""
  fp = next((r["top1"] for r in results if r["method"] == "fp"), None)
  lines = ["| method | bits | top-1 % | drop from FP | agrees with FP % | KL to FP | PoT | "
           "wall time s | s/iter (mean) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    drop = "" if fp is None or r["method"] == "fp" else f"{fp - r['top1']:.2f}"
    spi = r.get("seconds_per_iter") or {}
    mean_spi = f"{np.mean(list(spi.values())) * 1e3:.1f} ms" if spi else ""
    pot = "" if r["method"] == "fp" else ("yes" if r.get("power_of_two") else "no")
    wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else ""
    agree = f"{r['agreement']:.2f}" if "agreement" in r else ""
    kl = f"{r['kl_to_reference']:.4f}" if "kl_to_reference" in r else ""
    lines.append(f"| {r['method']} | {bits_label(r)} | {r['top1']:.2f} | {drop} | {agree} | "
                 f"{kl} | {pot} | {wall} | {mean_spi} |")
  return "\n".join(lines) + "\n"


def plot_top1(results: list[dict], path: pathlib.Path) -> None:
  """Grouped bars: top-1 per method, one group per bit width; FP as a line."""
  quant = [r for r in results if r["method"] != "fp"]
  bits = sorted({bits_label(r) for r in quant})
  methods = list(dict.fromkeys(r["method"] for r in quant))
  fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(bits) * max(len(methods), 1) / 2, 4))
  width = 0.8 / max(len(methods), 1)
  for i, m in enumerate(methods):
    vals = [next((r["top1"] for r in quant if r["method"] == m and bits_label(r) == b), np.nan)
            for b in bits]
    ax.bar(np.arange(len(bits)) + i * width, vals, width, label=m)
  ax.set_xticks(np.arange(len(bits)) + width * (len(methods) - 1) / 2, bits)
  save_top1_plot(fig, ax, next((r["top1"] for r in results if r["method"] == "fp"), None),
                 "Top-1 by method and bit width", path, legend="lower left")


def save_top1_plot(fig, ax, fp_top1: float | None, title: str, path: pathlib.Path, *,
                   legend: str) -> None:
  """Finishes a top-1 plot (the FP32 top-1 as a dashed line, labels, legend at
  ``legend``), writes it to ``path`` and closes it."""
  if fp_top1 is not None:
    ax.axhline(fp_top1, color="k", ls="--", lw=1, label=f"FP32 {fp_top1:.2f}")
  ax.set_ylabel("top-1 %")
  ax.set_title(title)
  ax.legend(fontsize=7, loc=legend)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_exponents(results: list[dict], path: pathlib.Path, *, methods=("naive", "rapq")) -> None:
  """Per weight layer: how many channels got each exponent, naive vs RAPQ (first bit
  width that has both), so the exponents RAPQ moved stand out."""
  by_bits = {}
  for r in results:
    if r["method"] in methods and r.get("weight_exponents"):
      by_bits.setdefault(bits_label(r), {})[r["method"]] = r["weight_exponents"]
  chosen = next(((b, d) for b, d in by_bits.items() if len(d) == len(methods)), None)
  if chosen is None:
    chosen = next(iter(by_bits.items()), None)
  if chosen is None:
    return
  bits, per_method = chosen
  layers = list(next(iter(per_method.values())))
  cols = min(6, len(layers))
  rows = -(-len(layers) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
  for ax, layer in zip(axes.flat, layers):
    values = sorted({int(e) for m in per_method.values() for e in m.get(layer, {})})
    width = 0.8 / len(per_method)
    for i, (m, hist) in enumerate(per_method.items()):
      counts = [hist.get(layer, {}).get(str(v), hist.get(layer, {}).get(v, 0)) for v in values]
      ax.bar(np.arange(len(values)) + i * width, counts, width, label=m)
    ax.set_xticks(np.arange(len(values)) + width * (len(per_method) - 1) / 2, values, fontsize=6)
    ax.set_title(layer, fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=6)
  fig.suptitle(f"Weight exponents per layer ({bits}): channels per exponent", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_losses(results: list[dict], path: pathlib.Path) -> None:
  """Reconstruction loss curves per unit (weight phase then activation phase), one
  panel per reconstructed method and bit width."""
  runs = [r for r in results if r.get("loss_curves")]
  if not runs:
    return
  fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False)
  for ax, r in zip(axes.flat, runs):
    for unit, hist in r["loss_curves"].items():
      w = hist.get("weights", [])
      a = [(s + (w[-1][0] if w else 0), v) for s, v in hist.get("acts", [])]
      pts = w + a
      if pts:
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=0.8, label=unit)
    ax.set_yscale("log")
    ax.set_xlabel("iteration (weights, then activations)")
    ax.set_title(f"{r['method']} {bits_label(r)}", fontsize=9)
  axes.flat[0].set_ylabel("Lp reconstruction loss")
  axes.flat[-1].legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
