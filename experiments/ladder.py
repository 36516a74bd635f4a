"""The time-to-accuracy ladder (``experiments.time_to_accuracy`` is its command): the
pipeline run once per iteration budget, its per-budget results collected into one
record and plotted. No flags here, so tests and other tools can import it."""
import json
import pathlib
import shlex
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)

from experiments import report  # noqa: E402
from rapq_jax import integrity  # noqa: E402

# Flags of experiments.run that the ladder sets itself.
OWN_FLAGS = ("--workdir", "--config.weight_iters", "--config.act_iters")


class LadderError(ValueError):
  """A bad budget list or run arguments (one line, naming the bad value)."""


def parse_budgets(text: str) -> list[tuple[int, int]]:
  """'250/62,500/125' -> [(250, 62), (500, 125)]: positive weight iterations, activation
  iterations >= 0, each budget once, in increasing order of weight iterations."""
  budgets = []
  for token in text.split(","):
    parts = token.strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise LadderError(f"--budgets: {token.strip()!r} is not W/A (two non-negative integers)")
    w, a = (int(p) for p in parts)
    if w < 1:
      raise LadderError(f"--budgets: {token.strip()!r} has no weight iterations")
    budgets.append((w, a))
  if len(set(budgets)) != len(budgets):
    raise LadderError(f"--budgets: {text!r} lists a budget twice")
  return sorted(budgets)


def check_run_args(args: list[str]) -> None:
  """LadderError if the run arguments set what the ladder sets per budget."""
  for arg in args:
    if arg.split("=", 1)[0] in OWN_FLAGS:
      raise LadderError(f"--run: {arg!r} is set by the ladder itself; remove it")


# Fields of a peer record (``../shared/peer/run_peer.py``) that a ladder row needs.
PEER_FIELDS = ("method", "peer_repo", "peer_commit", "wbits", "abits", "iters_w", "iters_a",
               "top1", "wall_s")


def peer_rows(paths: list[pathlib.Path]) -> list[dict]:
  """Rows of the official code's runs (JSON written by the peer harness, timed on the same
  machine as the ladder), read before anything runs; LadderError naming a bad file."""
  rows = []
  for path in paths:
    try:
      record = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
      raise LadderError(f"--peer: cannot read {str(path)!r} ({e})") from e
    missing = [k for k in PEER_FIELDS if not isinstance(record, dict) or k not in record]
    if missing:
      raise LadderError(f"--peer: {str(path)!r} is not a peer record (no {', '.join(missing)})")
    nonint = (record.get("rapq_exponents_nonint") or 0) + (record.get("act_scales_non_pow2") or 0)
    rows.append(dict(method=f"official {record['peer_repo']} {record['method']}",
                     wbits=record["wbits"], abits=record["abits"],
                     weight_iters=record["iters_w"], act_iters=record["iters_a"],
                     top1=record["top1"], wall_seconds=record["wall_s"],
                     power_of_two=nonint == 0 if "act_scales_non_pow2" in record else None,
                     peak_rss_mb=record.get("peak_rss_mb"), commit=record["peer_commit"],
                     torch=record.get("torch_version"), seed=record.get("seed"),
                     calibration_size=record.get("num_samples"), source=pathlib.Path(path).name))
  return rows


def budget_dir(workdir: pathlib.Path, budget: tuple[int, int]) -> pathlib.Path:
  return workdir / f"w{budget[0]}_a{budget[1]}"


def run_budget(args: list[str], budget: tuple[int, int], workdir: pathlib.Path) -> float:
  """Runs experiments.run at one budget (its progress and errors go to this terminal);
  returns the wall seconds of the process. LadderError if it fails."""
  w, a = budget
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "experiments.run", *args,
                         f"--workdir={budget_dir(workdir, budget)}",
                         f"--config.weight_iters={w}", f"--config.act_iters={a}"], check=False)
  if proc.returncode:
    raise LadderError(f"experiments.run at budget {w}/{a} failed with exit code "
                      f"{proc.returncode} (its error is above)")
  return time.perf_counter() - start


def rows_of(record: dict, budget: tuple[int, int], process_seconds: float | None) -> list[dict]:
  """One row per quantized result of a budget's results.json (with the compilation
  cache's hits and misses during that result's run)."""
  rows = []
  for r in record["results"]:
    if r["method"] == "fp":
      continue
    rows.append(dict(weight_iters=budget[0], act_iters=budget[1], method=r["method"],
                     wbits=r["wbits"], abits=r["abits"], top1=r["top1"],
                     agreement=r.get("agreement"), kl_to_reference=r.get("kl_to_reference"),
                     power_of_two=r.get("power_of_two"),
                     quantize_seconds=r.get("quantize_seconds"),
                     wall_seconds=r.get("wall_seconds"), process_seconds=process_seconds,
                     compilation_cache=r.get("compilation_cache")))
  return rows


def plot(rows: list[dict], fp_top1: float | None, path: pathlib.Path,
         peers: list[dict] = ()) -> None:
  """Top-1 against wall seconds, one line per method and bit width, budgets labelled;
  the official code's runs as stars."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in peers:
    ax.plot([r["wall_seconds"]], [r["top1"]], "*", markersize=10,
            label=f"{r['method']} {report.bits_label(r)} ({r['weight_iters']}/{r['act_iters']})")
  for key in dict.fromkeys((r["method"], report.bits_label(r)) for r in rows):
    pts = sorted((r for r in rows if (r["method"], report.bits_label(r)) == key),
                 key=lambda r: r["wall_seconds"])
    ax.plot([r["wall_seconds"] for r in pts], [r["top1"] for r in pts], "o-",
            label=f"{key[0]} {key[1]}")
    for r in pts:
      ax.annotate(f"{r['weight_iters']}/{r['act_iters']}", (r["wall_seconds"], r["top1"]),
                  fontsize=6, xytext=(3, -8), textcoords="offset points")
  ax.set_xlabel("wall seconds per method and bit width")
  report.save_top1_plot(fig, ax, fp_top1,
                        "Time to accuracy (labels: weight/activation iterations per unit)",
                        path, legend="lower right")


def run_ladder(args: list[str], budgets: list[tuple[int, int]], workdir: pathlib.Path,
               out: pathlib.Path, runner=run_budget, peers: list[pathlib.Path] = ()) -> dict:
  """Runs every budget (``runner(args, budget, workdir)`` -> process seconds), then
  writes the record (with the ``peers`` records' rows under ``peer``) and its plot;
  returns the record."""
  check_run_args(args)
  peer = peer_rows(list(peers))
  rows, fp_top1, config = [], None, None
  for i, budget in enumerate(budgets):
    print(f"[time to accuracy] budget {i + 1}/{len(budgets)}: {budget[0]}/{budget[1]} "
          "iterations per unit", flush=True)
    seconds = runner(args, budget, workdir)
    record = json.loads((budget_dir(workdir, budget) / "results.json").read_text())
    fp_top1 = next((r["top1"] for r in record["results"] if r["method"] == "fp"), fp_top1)
    config = config or {k: v for k, v in record["config"].items()
                        if k not in ("weight_iters", "act_iters")}
    rows += rows_of(record, budget, seconds)
  result = dict(time_to_accuracy=dict(run=shlex.join(args), budgets=[list(b) for b in budgets],
                                      fp_top1=fp_top1, config=config),
                rows=rows, peer=peer, **report.environment())
  out.parent.mkdir(parents=True, exist_ok=True)
  plot(rows, fp_top1, out.with_suffix(".png"), peer)
  integrity.atomic_write(out, json.dumps(result, indent=1))
  return result
