"""Specification of ``experiments.time_to_accuracy``: budgets are checked before anything
runs; a ladder runs ``experiments.run`` once per budget and records, per budget, method
and bit width, top-1 and wall time with a plot, which the results document renders."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from cli import REPO, TINY
from experiments import ladder as tta, results_doc

RUN = [a for a in TINY if not a.startswith(tta.OWN_FLAGS)] + ["--methods", "rapq"]


def _cli(*args, cwd):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.time_to_accuracy", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("text, expected", [
    ("250/62,500/125", [(250, 62), (500, 125)]),
    ("2000/500, 500/0", [(500, 0), (2000, 500)]),
    ("8/2", [(8, 2)]),
])
def test_budgets_parse_in_increasing_order(text, expected):
  assert tta.parse_budgets(text) == expected


@pytest.mark.parametrize("text, bad", [
    ("250", "'250'"), ("250/x", "'250/x'"), ("0/10", "'0/10'"), ("-5/1", "'-5/1'"),
    ("8/2,8/2", "twice"), ("8/2,,16/4", "''"),
])
def test_bad_budgets_are_named(text, bad):
  with pytest.raises(tta.LadderError, match=bad):
    tta.parse_budgets(text)


@pytest.mark.parametrize("arg", ["--workdir=x", "--config.weight_iters=5",
                                 "--config.act_iters=1"])
def test_run_arguments_may_not_set_what_the_ladder_sets(arg, tmp_path):
  with pytest.raises(tta.LadderError, match=arg.split("=")[0]):
    tta.run_ladder(["--config", "fmnist_resnet", arg], [(8, 2)], tmp_path / "runs",
               tmp_path / "out.json", runner=pytest.fail)
  assert not list(tmp_path.iterdir())


def test_bad_budget_is_one_line_before_anything_is_written(tmp_path):
  proc = _cli("--budgets=8/2,abc", f"--workdir={tmp_path / 'runs'}",
              f"--out={tmp_path / 'ladder.json'}", cwd=tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "experiments.time_to_accuracy: error: --budgets: 'abc' is not W/A (two non-negative "
      "integers)"]
  assert not list(tmp_path.iterdir())


def test_a_failing_run_stops_the_ladder_naming_its_budget(tmp_path):
  proc = _cli("--run=--config no_such_config", "--budgets=4/1,8/2",
              f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path / 'ladder.json'}", cwd=tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "experiments.time_to_accuracy: error: experiments.run at budget 4/1 failed with exit "
      "code 1 (its error is above)")
  assert not (tmp_path / "ladder.json").exists()


def test_ladder_records_each_budgets_run_and_renders(tmp_path):
  """A real ladder of one budget (naive: no reconstruction, so it is quick): its row is
  the run's own record; the record, plot and results-document section are written."""
  out = tmp_path / "results" / "ladder.json"
  run = [a for a in RUN if a != "rapq"] + ["naive"]
  proc = _cli(f"--run={shlex.join(run)}", "--budgets=4/1", f"--workdir={tmp_path / 'runs'}",
              f"--out={out}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  result = json.loads((tmp_path / "runs" / "w4_a1" / "results.json").read_text())
  (q,) = [r for r in result["results"] if r["method"] == "naive"]
  assert q["ptq"]["weight_iters"] == 4 and q["ptq"]["act_iters"] == 1
  (row,) = record["rows"]
  assert {k: row[k] for k in ("method", "wbits", "abits", "top1", "agreement", "wall_seconds",
                              "quantize_seconds", "power_of_two")} == {
      k: q[k] for k in ("method", "wbits", "abits", "top1", "agreement", "wall_seconds",
                        "quantize_seconds", "power_of_two")}
  assert (row["weight_iters"], row["act_iters"]) == (4, 1)
  assert row["process_seconds"] > row["wall_seconds"] > 0
  assert record["time_to_accuracy"]["fp_top1"] == result["results"][0]["top1"]
  assert record["time_to_accuracy"]["run"] == shlex.join(run)
  assert record["git"] == result["git"]
  assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
  text = results_doc.render(out.parent)
  assert "## ladder (time to accuracy)" in text and "](../results/ladder.png)" in text
  assert f"| naive | W4A4 | 4/1 | {row['top1']:.2f} |" in text


def test_rows_follow_the_budgets_in_increasing_order(tmp_path):
  """Budgets run from the smallest; each contributes a row per method and bit width."""
  def runner(args, budget, workdir):
    directory = tta.budget_dir(workdir, budget)
    directory.mkdir(parents=True)
    results = [dict(method="fp", wbits=None, abits=None, top1=90.0)] + [
        dict(method=m, wbits=w, abits=4, top1=50.0 + budget[0] / 100 + w, wall_seconds=budget[0] / 10,
             quantize_seconds=budget[0] / 20, power_of_two=m != "brecq")
        for m in ("brecq", "rapq") for w in (2, 4)]
    (directory / "results.json").write_text(json.dumps(
        dict(config=dict(model="m", weight_iters=budget[0]), results=results)))
    return budget[0] / 5

  record = tta.run_ladder(RUN, tta.parse_budgets("1000/250,250/62"), tmp_path / "runs",
                          tmp_path / "out.json", runner=runner)
  assert [(r["weight_iters"], r["method"], r["wbits"]) for r in record["rows"]] == [
      (250, "brecq", 2), (250, "brecq", 4), (250, "rapq", 2), (250, "rapq", 4),
      (1000, "brecq", 2), (1000, "brecq", 4), (1000, "rapq", 2), (1000, "rapq", 4)]
  assert record["time_to_accuracy"]["config"] == {"model": "m"}
  assert record["time_to_accuracy"]["budgets"] == [[250, 62], [1000, 250]]
  assert json.loads((tmp_path / "out.json").read_text()) == record
  assert (tmp_path / "out.png").stat().st_size > 0


def _peer(path, **fields):
  record = {**dict(method="rapq", peer_repo="RAPQ", peer_commit="aaa71dff8e8e3e87", wbits=2,
                   abits=4, iters_w=2000, iters_a=500, top1=55.2, wall_s=300.0,
                   peak_rss_mb=9000.0, torch_version="2.13.0+cpu", rapq_exponents_nonint=680,
                   act_scales_non_pow2=19), **fields}
  path.write_text(json.dumps(record))
  return path


def test_official_runs_are_recorded_and_our_time_to_their_top1_is_read_off(tmp_path):
  """Peer records are rows under 'peer' (not power of two where the official code's scales
  are not); the document gives the first budget reaching each one's top-1 and its share
  of the official wall time."""
  def runner(args, budget, workdir):
    directory = tta.budget_dir(workdir, budget)
    directory.mkdir(parents=True)
    results = [dict(method="fp", wbits=None, abits=None, top1=90.0),
               dict(method="rapq", wbits=2, abits=4, top1=50.0 + budget[0] / 100,
                    wall_seconds=budget[0] / 10, power_of_two=True)]
    (directory / "results.json").write_text(json.dumps(dict(config={}, results=results)))
    return budget[0] / 5

  peers = [_peer(tmp_path / "rapq.json"), _peer(tmp_path / "far.json", top1=99.0)]
  out = tmp_path / "results" / "ladder.json"
  record = tta.run_ladder(RUN, [(250, 62), (1000, 250)], tmp_path / "runs", out,
                          runner=runner, peers=peers)
  assert [(p["method"], p["top1"], p["wall_seconds"], p["power_of_two"], p["source"])
          for p in record["peer"]] == [("official RAPQ rapq", 55.2, 300.0, False, "rapq.json"),
                                      ("official RAPQ rapq", 99.0, 300.0, False, "far.json")]
  text = results_doc.render(out.parent)
  assert "| official RAPQ rapq (`aaa71dff8e`) | W2A4 | 2000/500 | 55.20 |  |  | no | 300 |" in text
  assert ("official RAPQ rapq W2A4 (55.20 % in 300 s, 2000/500): rapq reaches it first at "
          "1000/250 (60.00 %) in 100 s, 0.33x the official time.") in text
  assert "(99.00 % in 300 s, 2000/500): no budget here reaches it." in text


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    (json.dumps({"method": "rapq"}), "is not a peer record .no peer_repo, peer_commit"),
])
def test_bad_peer_records_are_named_before_anything_runs(tmp_path, content, match):
  bad = tmp_path / "peer.json"
  bad.write_text(content)
  with pytest.raises(tta.LadderError, match=match):
    tta.run_ladder(RUN, [(8, 2)], tmp_path / "runs", tmp_path / "out.json",
                   runner=pytest.fail, peers=[bad])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.json"]
