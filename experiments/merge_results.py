r"""Merges the results.json of runs that were split across processes into one record
(or the JSON of several ``experiments.bench`` runs into one).

  python -m experiments.merge_results OUT.json RUN1/results.json RUN2/results.json ...
  python -m experiments.merge_results OUT.json A.json=TF32 B.json=highest --note "..."

Every input must come from the same config (apart from its bit widths) and the same git
commit; their quantized results are concatenated in the given order and the FP result is
kept once. ``FILE=LABEL`` appends `` [LABEL]`` to the method names of that file's
results, for runs that differ in a setting the table does not show. ``--device_kind``
records the accelerator where the runs' own records predate that field; ``--note`` is
shown under the table in docs/RESULTS.md.
"""
import json
import pathlib

from absl import app
from absl import flags

from rapq_jax import integrity

_NOTE = flags.DEFINE_string("note", None, "Text shown with the merged table.")
_DEVICE_KIND = flags.DEFINE_string("device_kind", None,
                                   "Accelerator name, where the records lack machine.device_kind.")
_IGNORED = ("wbits", "abits", "matmul_precision")


def _comparable(config: dict) -> dict:
  return {k: v for k, v in config.items() if k not in _IGNORED}


def merge(records: list[tuple[dict, str | None]], *, note: str | None = None,
          device_kind: str | None = None) -> dict:
  """One record from ``(record, label)`` pairs; ValueError names a mismatch."""
  first = records[0][0]
  rows = "units" if "units" in first and "results" not in first else "results"
  merged = {k: v for k, v in first.items() if k != rows}
  merged[rows] = []
  for i, (record, label) in enumerate(records):
    if rows == "units":  # benchmark records: unit rows of the same commit
      if record["git"].get("commit") != first["git"].get("commit"):
        raise ValueError(f"input {i + 1} differs from input 1 in git: "
                         f"{first['git'].get('commit')} vs {record['git'].get('commit')}")
      merged["units"] += record["units"]
      continue
    for key in ("config", "git"):
      a = _comparable(record[key]) if key == "config" else record[key].get("commit")
      b = _comparable(first[key]) if key == "config" else first[key].get("commit")
      if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) \
            if key == "config" else [f"{b} vs {a}"]
        raise ValueError(f"input {i + 1} differs from input 1 in {key}: {diff}")
    for r in record["results"]:
      if r["method"] == "fp":
        if not any(m["method"] == "fp" for m in merged["results"]):
          merged["results"].insert(0, r)
        continue
      merged["results"].append({**r, "method": f"{r['method']} [{label}]"} if label else r)
  if device_kind:
    merged["machine"] = {**merged.get("machine", {}), "device_kind": device_kind}
  if note:
    merged["note"] = note
  return merged


def main(argv):
  if len(argv) < 3:
    raise app.UsageError("usage: merge_results OUT.json IN.json[=LABEL] IN.json[=LABEL] ...")
  out, inputs = pathlib.Path(argv[1]), []
  for arg in argv[2:]:
    path, _, label = arg.partition("=")
    if not pathlib.Path(path).is_file():
      raise app.UsageError(f"no such results file: {path}")
    inputs.append((json.loads(pathlib.Path(path).read_text()), label or None))
  try:
    merged = merge(inputs, note=_NOTE.value, device_kind=_DEVICE_KIND.value)
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  integrity.atomic_write(out, json.dumps(merged, indent=1))
  print(f"wrote {out}: {len(merged.get('results', merged.get('units')))} rows")


if __name__ == "__main__":
  app.run(main)
