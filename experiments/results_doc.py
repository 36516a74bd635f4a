r"""Generates docs/RESULTS.md from the committed result files; never edit it by hand.

  python -m experiments.results_doc            # rewrite docs/RESULTS.md
  python -m experiments.results_doc --check    # exit 1 if it is out of date

Inputs: every ``results/*.json`` (each the ``results.json`` of an ``experiments.run``
invocation, or the record of ``experiments.bench`` or ``experiments.time_to_accuracy``,
whose plot is the ``.png`` of the same name), in file-name order, plus
``results/reference/*.json`` (figures measured with other code, shown as references
with their stated source).
"""
import json
import pathlib
import sys

from absl import app
from absl import flags

from experiments import report
from rapq_jax import config as ptq_config_lib
from rapq_jax import integrity
from rapq_jax import rounding

REPO = pathlib.Path(__file__).resolve().parents[1]
_CHECK = flags.DEFINE_bool("check", False, "Only check that docs/RESULTS.md is up to date.")
_RESULTS = flags.DEFINE_string("results_dir", str(REPO / "results"), "Result files directory.")
_OUT = flags.DEFINE_string("out", str(REPO / "docs" / "RESULTS.md"), "Markdown file to write.")


def _commit(record: dict) -> str:
  """The git commit a record was produced at ('unknown' where it has none)."""
  return (record.get("git") or {}).get("commit") or "unknown"


def _ptq(record: dict) -> dict:
  """The PTQConfig fields of a record's first quantized result, by their names now (a
  record written before a rename holds the old ones), or {}."""
  ptq = next((r.get("ptq") for r in record["results"] if r.get("ptq")), {}) or {}
  return ptq_config_lib.current_names(ptq)


def _rounding_rate(row: dict) -> str:
  """The learning rate of a result row's rounding logits (``lr_w``, scaled by
  ``rounding.lr_scale``; rows recorded before ``lr_w_ref_iters`` existed used
  ``lr_w`` as given), or '' for a row that did not reconstruct."""
  ptq = ptq_config_lib.current_names(row.get("ptq") or {})
  if not ptq or not ptq.get("reconstruct", True):
    return ""
  lr, ref, iters = ptq.get("lr_w", 1e-3), ptq["lr_w_ref_iters"], ptq.get("weight_iters")
  return format(lr * float(rounding.lr_scale(ref, iters)) if iters else lr, ".3g")


def _protocol(row: dict) -> str:
  """The PTQ protocol a result row used (``PTQConfig.protocol``); rows recorded before
  the field existed ran the only protocol there was, 'strict'."""
  return (row.get("ptq") or {}).get("protocol", "strict")


def _run_section(name: str, record: dict) -> str:
  cfg = record.get("config", {})
  env = record.get("machine", {})
  ptq = _ptq(record)
  facts = [
      f"model `{cfg.get('model', '?')}`",
      f"{cfg.get('calibration_size', '?')} calibration images",
      f"{ptq.get('weight_iters', cfg.get('weight_iters', '?'))}/"
      f"{ptq.get('act_iters', cfg.get('act_iters', '?'))} weight/activation iterations per unit",
      f"batch {ptq.get('batch_size', cfg.get('batch_size', '?'))}",
      f"seed {cfg.get('seed', '?')}",
  ]
  test_n = next((r.get("n") for r in record["results"]), None)
  if test_n:
    facts.append(f"{test_n} test images")
  machine = f"{env.get('processor', '?')}, {env.get('cpu_count', '?')} CPUs, " \
            f"devices {', '.join(env.get('devices', []))}"
  if env.get("device_kind"):
    machine += f" ({env['device_kind']}"
    machine += f", matmul precision {env['matmul_precision']})" if "matmul_precision" in env else ")"
  commit = _commit(record)
  lines = [f"## {name}", "", "; ".join(facts) + ".", "",
           f"Machine: {machine}. Versions: " +
           ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items()) +
           f". Commit `{commit[:10]}`.", "", report.results_table(record["results"])]
  official = list(dict.fromkeys(r["method"] for r in record["results"]
                                if r["method"] != "fp" and _protocol(r) != "strict"))
  lines += ([f"Protocol (README, 'Protocols'): {', '.join(official)} official, the others "
             "strict.", ""] if official else ["Protocol: strict (README, 'Protocols').", ""])
  if record.get("note"):
    lines += [record["note"], ""]
  searches = [(r["method"], f"W{r['wbits']}A{r['abits']}", r["search"],
               (r.get("ptq") or {}).get("search_objective", "kl"))
              for r in record["results"] if r.get("search")]
  if searches:
    lines += ["Network-wide exponent search (its objective against the FP logits on calibration "
              "images: KL to them unless the line names another):", ""]
    for method, bits, s, kind in searches:
      for when, info in s.items():
        lines.append(f"- {method} {bits}, {_search_when(when, info)}: "
                     + ("" if kind == "kl" else f"{kind} ")
                     + f"{info['before']:.4f} -> "
                     f"{info['after']:.4f} in {info['sweeps']} sweep(s)"
                     + (" (stopped at its sweep limit, still moving)" if info.get("capped") else "")
                     + f", {len(info['moved'])} exponent(s) moved, {info['seconds']:.1f} s"
                     + _search_images(info.get("images"))
                     + {True: "; kept", False: "; not kept"}.get(info.get("kept"), ""))
    lines.append("")
  return "\n".join(lines)


def _search_when(when: str, info: dict) -> str:
  """'before reconstruction', 'after reconstruction' or, for a later round of
  ``search_rounds``, which units were reconstructed again before it."""
  if when == "acts_before":
    return "activations before reconstruction (first_last_bits weights)"
  if not when.startswith("round_"):
    return f"{when} reconstruction"
  return (f"round {when[len('round_'):]}, after reconstructing "
          f"{len(info['rereconstructed'])} unit(s) again")


def _search_images(images: dict | None) -> str:
  """Which calibration images a search scored (records before issue 13 do not say)."""
  if not images:
    return ""
  (start, stop), fit = images["rows"], images["reconstruction_rows"]
  if images["held_out"]:
    return (f"; scored on {stop - start} held-out calibration images (rows {start}-{stop - 1}; "
            f"reconstruction used rows {fit[0]}-{fit[1] - 1})")
  return f"; scored on calibration rows {start}-{stop - 1}, which reconstruction also used"


def _bench_section(name: str, record: dict) -> str:
  env = record.get("machine", {})
  device = ", ".join(env.get("devices", [])) + (f" ({env['device_kind']})"
                                                 if env.get("device_kind") else "")
  lines = [f"## {name} (benchmark)", "", f"Device: {device}.", "",
           "| model | unit | shape | weight s/iter | activation s/iter | compile s |",
           "|---|---|---|---|---|---|"]
  for u in record["units"]:
    lines.append(f"| {u.get('model', '')} | {u['name']} | {u['input_shape']} | "
                 f"{u['weight_s_per_iter']:.4f} | "
                 f"{u['act_s_per_iter']:.4f} | {u['compile_s']:.1f} |")
  if record.get("note"):
    lines += ["", record["note"]]
  if "pipeline" in record:
    p = record["pipeline"]
    lines += ["", f"Whole pipeline: {p['wall_seconds']:.0f} s wall, peak RSS "
              f"{p['peak_rss_mb']:.0f} MB ({p.get('what', '')})."]
  return "\n".join(lines) + "\n"


def _cache_lookups(cache: dict | None) -> str:
  """'hits / misses' of the persistent compilation cache during a ladder run (misses are
  programs compiled); blank if not recorded."""
  return "" if cache is None else f"{cache['hits']} / {cache['misses']}"


def _ladder_section(name: str, record: dict) -> str:
  """A time-to-accuracy record (``experiments.time_to_accuracy``): its plot and one row
  per method, bit width and budget."""
  t, env = record["time_to_accuracy"], record.get("machine", {})
  cfg = t.get("config") or {}
  device = env.get("device_kind") or ", ".join(env.get("devices", []))
  lines = [f"## {name} (time to accuracy)", "",
           f"`python -m experiments.run {t['run']}` at each budget (weight/activation "
           f"iterations per unit), one after the other; model `{cfg.get('model', '?')}`, "
           f"{cfg.get('calibration_size', '?')} calibration images, seed "
           f"{cfg.get('seed', '?')}; device {device}; commit `{_commit(record)[:10]}`. "
           "Wall seconds are each method's and bit width's own (quantization and its test-set "
           "evaluation); 'cache hits / misses' counts the programs of that run that the persistent "
           "compilation cache served and those it compiled (blank: not recorded). The FP32 "
           "top-1 is "
           + (f"{t['fp_top1']:.2f} %." if t.get("fp_top1") is not None else "not recorded."),
           "", f"![top-1 against wall time](../results/{name}.png)", "",
           "| method | bits | iterations | top-1 % | agrees with FP % | KL to FP | PoT | "
           "wall s | quantize s | cache hits / misses |", "|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, spec: "" if v is None else format(v, spec)
  for r in sorted(record["rows"], key=lambda r: (r["method"], report.bits_label(r),
                                                  r["weight_iters"], r["act_iters"])):
    pot = "" if r.get("power_of_two") is None else ("yes" if r["power_of_two"] else "no")
    lines.append(f"| {r['method']} | {report.bits_label(r)} | {r['weight_iters']}/"
                 f"{r['act_iters']} | {r['top1']:.2f} | {fmt(r.get('agreement'), '.2f')} | "
                 f"{fmt(r.get('kl_to_reference'), '.4f')} | {pot} | "
                 f"{fmt(r.get('wall_seconds'), '.0f')} | {fmt(r.get('quantize_seconds'), '.0f')} | "
                 f"{_cache_lookups(r.get('compilation_cache'))} |")
  for r in record.get("peer", []):
    pot = "" if r.get("power_of_two") is None else ("yes" if r["power_of_two"] else "no")
    lines.append(f"| {r['method']} (`{r['commit'][:10]}`) | {report.bits_label(r)} | "
                 f"{r['weight_iters']}/{r['act_iters']} | {r['top1']:.2f} |  |  | {pot} | "
                 f"{r['wall_seconds']:.0f} |  |  |")
  lines += _time_fractions(record)
  if record.get("note"):
    lines += ["", record["note"]]
  return "\n".join(lines) + "\n"


def _time_fractions(record: dict) -> list[str]:
  """Per official run: the first budget at which ours reaches its top-1 at the same bit
  widths, and that run's wall time as a fraction of the official one."""
  out = []
  for p in record.get("peer", []):
    ours = sorted((r for r in record["rows"] if report.bits_label(r) == report.bits_label(p)),
                  key=lambda r: r["wall_seconds"])
    first = next((r for r in ours if r["top1"] >= p["top1"]), None)
    what = (f"{p['method']} {report.bits_label(p)} ({p['top1']:.2f} % in "
            f"{p['wall_seconds']:.0f} s, {p['weight_iters']}/{p['act_iters']})")
    if first is None:
      out.append(f"- {what}: no budget here reaches it.")
    else:
      out.append(f"- {what}: {first['method']} reaches it first at "
                 f"{first['weight_iters']}/{first['act_iters']} ({first['top1']:.2f} %) in "
                 f"{first['wall_seconds']:.0f} s, {first['wall_seconds'] / p['wall_seconds']:.2f}x "
                 "the official time.")
  return ["", "Official code run on the same machine (`../shared/peer/run_peer.py`), "
          "against this ladder:", "", *out] if out else []


def _reference_section(record: dict) -> str:
  lines = [f"## Reference: {record['title']}", "", f"Source: {record['source']}", "",
           "| " + " | ".join(record["columns"]) + " |", "|" + "---|" * len(record["columns"])]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in record["rows"]]
  return "\n".join(lines) + "\n"


def _summary_section(model: str, runs: list[tuple[str, dict]]) -> str:
  """One table per model across result files: top-1 per method (a row per method and
  file) and bit width, so baselines and ablations from separate runs read side by side."""
  bits = sorted({report.bits_label(r) for _, rec in runs for r in rec["results"]
                 if r["wbits"] is not None}, key=lambda b: (-int(b[1]), b))
  lines = [f"## Summary: {model}", "",
           "Top-1 % by method and bit width; details of each file in its own section below. "
           "A method name means that method as the file's commit implemented it: rows of one "
           "method from different commits can differ in defaults (the file's section says how). "
           "Protocol: which units are reconstructed, in which order, on what inputs "
           "(README, 'Protocols'; strict unless the row says official). Rounding rate: the "
           "learning rate of the rounding logits (README, 'Learning rate and budget').",
           "", "| method | " + " | ".join(bits) + " | protocol | iterations | rounding rate | "
           "device | commit | file |",
           "|---|" + "---|" * (len(bits) + 6)]
  for name, rec in runs:
    env = rec.get("machine", {})
    device = env.get("device_kind") or ", ".join(env.get("devices", []))
    ptq = _ptq(rec)
    iters = f"{ptq.get('weight_iters', '?')}/{ptq.get('act_iters', '?')}"
    methods = list(dict.fromkeys(r["method"] for r in rec["results"] if r["method"] != "fp"))
    for m in methods:
      rows = [r for r in rec["results"] if r["method"] == m]
      cells = [next((f"{r['top1']:.2f}" for r in rows if report.bits_label(r) == b), "")
               for b in bits]
      protocol = "/".join(dict.fromkeys(_protocol(r) for r in rows))
      rate = "/".join(dict.fromkeys(_rounding_rate(r) for r in rows))
      # A row computed at another commit than its file's (a resumed run) says its own.
      commit = "`/`".join(dict.fromkeys(_commit(r if r.get("git") else rec)[:7] for r in rows))
      lines.append(f"| {m} | " + " | ".join(cells) + f" | {protocol} | {iters} | {rate} | "
                   f"{device} | `{commit}` | {name} |")
  return "\n".join(lines) + "\n"


def render(results_dir: pathlib.Path) -> str:
  """The whole RESULTS.md text from the files in ``results_dir``."""
  parts = ["# Results", "",
           "Generated by `python -m experiments.results_doc` from the files in `results/`; "
           "do not edit by hand. Top-1 is on the full test split unless stated. "
           "`PoT` says whether every scale of the quantized model is an exact power of two.",
           ""]
  records = [(path.stem, json.loads(path.read_text()))
             for path in sorted(results_dir.glob("*.json"))]
  runs = [(name, rec) for name, rec in records if "results" in rec]
  for model in dict.fromkeys(rec.get("config", {}).get("model", "?") for _, rec in runs):
    parts.append(_summary_section(model, [(n, r) for n, r in runs
                                          if r.get("config", {}).get("model", "?") == model]))
  for name, record in records:
    if "results" in record:
      parts.append(_run_section(name, record))
    elif "time_to_accuracy" in record:
      parts.append(_ladder_section(name, record))
    else:
      parts.append(_bench_section(name, record))
  for path in sorted((results_dir / "reference").glob("*.json")):
    parts.append(_reference_section(json.loads(path.read_text())))
  return "\n".join(parts)


def main(argv):
  del argv
  text = render(pathlib.Path(_RESULTS.value))
  out = pathlib.Path(_OUT.value)
  if _CHECK.value:
    if not out.exists() or out.read_text() != text:
      sys.exit(f"{out} is out of date: run python -m experiments.results_doc")
    print(f"{out} is up to date")
    return
  integrity.atomic_write(out, text)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
