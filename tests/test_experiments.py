"""The quantization job: method presets, outputs, the generated RESULTS.md, end to end."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import merge_results, methods, report, results_doc
from experiments.configs import base
from rapq_jax import quantized

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = ["--config.weight_iters=12", "--config.act_iters=4", "--config.ptq.exp_warm_iters=4",
        "--config.calibration_size=64", "--config.test_size=300",
        "--config.ptq.search_samples=32", "--config.ptq.search_sweeps=1"]


@pytest.mark.parametrize("method, field, value", [
    ("naive", "reconstruct", False),
    ("naive", "search", "none"),
    ("brecq", "pot_scales", False),
    ("brecq_pot", "learn_exponent", False),
    ("rapq", "exp_init", "lp"),
    ("rapq", "loss_p_source", "bn"),
    ("rapq_learned_exp", "learn_exponent", True),
    ("rapq_learned_exp", "exp_b_hold", False),
    ("rapq_learned_exp_official", "learn_exponent", True),
    ("rapq_learned_exp_official", "exp_b_hold", True),
    ("rapq_learned_exp_official", "reinit_alpha_on_harden", False),
    ("rapq_weight_choice", "weight_exp_window", 1),
    ("rapq_weight_choice", "learn_exponent", False),
    ("rapq_nearest_exp", "exp_init", "nearest"),
    ("rapq_grid", "exp_init", "grid"),
    ("rapq", "align_scales", "stream"),
    ("rapq_no_align", "align_scales", "none"),
    ("brecq_pot", "align_scales", "none"),
    ("naive", "align_scales", "none"),
    ("rapq_align_weights", "align_scales", "weights"),
    ("rapq_align_acts", "align_scales", "acts"),
    ("rapq_align_all", "align_scales", "acts_stream"),
    ("rapq_align_weights_stream", "align_scales", "weights_stream"),
    ("rapq_equalize", "align_scales", "equalize_stream"),
    ("brecq_equalize", "align_scales", "equalize"),
    ("brecq_equalize", "pot_scales", False),
    ("rapq", "learn_bias", False),
    ("rapq_bias", "learn_bias", True),
    ("rapq", "act_presearch", False),
    ("rapq_act_presearch", "act_presearch", True),
    ("rapq_act_presearch", "align_scales", "stream"),
    ("rapq_no_bnp", "loss_p_source", "fixed"),
    ("rapq_bnstats", "bn_stats_weight", 1.0),
    ("rapq", "search", "none"),
    ("rapq_search", "search", "after"),
    ("rapq_search_folds", "search_folds", 2),
    ("rapq", "search_confidence", 0.0),
    ("rapq_search_confident", "search_confidence", 2.0),
    ("rapq", "search_objective", "kl"),
    ("rapq_search_ce", "search_objective", "ce"),
    ("rapq", "search_rounds", 1),
    ("rapq_search_rounds", "search_rounds", 2),
    ("rapq", "weight_phase_act_quant", 0.0),
    ("rapq_qdrop", "weight_phase_act_quant", 0.5),
    ("brecq_pot", "pot_parts", "both"),
    ("rapq", "act_exp_init", "lp"),
    ("rapq_nearest_act_exp", "act_exp_init", "nearest"),
    ("brecq_pot", "act_exp_init", "nearest"),
    ("naive", "act_exp_init", "nearest"),
    ("brecq_pot_weights", "pot_parts", "weights"),
    ("brecq_pot_acts", "pot_parts", "acts"),
    ("brecq_pot_outputs", "pot_parts", "outputs"),
    ("brecq_pot_inner", "pot_parts", "inner"),
    ("rapq_pot_weights", "pot_parts", "weights"),
    ("rapq_pot_acts", "pot_parts", "acts"),
    ("rapq_pot_outputs", "pot_parts", "outputs"),
    ("rapq_pot_inner", "pot_parts", "inner"),
    ("rapq_pot_outputs", "align_scales", "stream"),
    ("rapq", "protocol", "strict"),
    ("rapq_official", "protocol", "official"),
    ("rapq_official", "loss_p_source", "bn"),
    ("brecq_official", "protocol", "official"),
    ("brecq_official", "pot_scales", False),
])
def test_method_presets(method, field, value):
  assert getattr(methods.ptq_config(base.get_base_config(), method), field) == value


def test_config_fields_reach_the_method_but_presets_survive_unset_fields():
  config = base.get_base_config()
  config.wbits, config.weight_iters, config.ptq.loss_p_coef = 2, 700, 0.5
  cfg = methods.ptq_config(config, "rapq")
  assert (cfg.wbits, cfg.weight_iters, cfg.loss_p_coef) == (2, 700, 0.5)
  assert not methods.ptq_config(config, "naive").reconstruct


@pytest.mark.parametrize("field, value", [("search", "after"), ("loss_p_source", "bn")])
def test_a_given_field_wins_over_the_preset_even_at_its_default(field, value):
  """``--methods brecq_pot --config.ptq.search=after``: the preset sets search='none',
  and the given value wins (also where it equals PTQConfig's default, as
  ``loss_p_source='bn'``); the rest of the preset stays."""
  config = base.get_base_config()
  config.ptq[field] = value
  cfg = methods.ptq_config(config, "brecq_pot")
  assert getattr(cfg, field) == value and cfg.exp_init == "nearest"


def test_a_field_contradicting_an_ablations_switch_is_refused():
  config = base.get_base_config()
  config.ptq.search = "none"
  with pytest.raises(ValueError, match=r"'rapq_search' is 'rapq' with \{'search': 'after'\}"):
    methods.ptq_config(config, "rapq_search")
  config.ptq.search = "after"   # the same value is no contradiction
  assert methods.ptq_config(config, "rapq_search").search == "after"


@pytest.mark.parametrize("field, value, message", [
    ("wbits", 9, "wbits"),
    ("weight_iters", 100, "exp_warm_iters = 500 exceeds weight_iters = 100"),
])
def test_bad_config_values_are_named(field, value, message):
  config = base.get_base_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    methods.ptq_config(config, "rapq_learned_exp")


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match="'bogus'.*naive"):
    methods.ptq_config(base.get_base_config(), "bogus")


def one_layer_model(e=(-3, -2), e_dtype=np.int32, act_e=-4):
  """A hand-made QuantizedModel: one 4-bit unsigned layer (2 channels, zero point 8)
  with weight exponents ``e`` and one activation point with exponent ``act_e``."""
  return quantized.QuantizedModel(
      units=(), bits=(("u/conv", 4, False), ("u/@out", 4, False)), metadata="{}",
      weights={"u": {"conv": {"q": np.array([[0, 15], [7, 9]], np.uint8),
                              "e": np.array(e, e_dtype), "zp": np.array([8, 8], np.int32),
                              "bias": np.zeros(2, np.float32)}}},
      acts={"u": {"out": np.int32(act_e)}})


@pytest.mark.parametrize("model, expected", [
    (one_layer_model(), "yes"),
    (None, "no"),                                              # float scales: no PoT model
    (one_layer_model(e=(-2.5, -2), e_dtype=np.float32), "no"),  # 2**-2.5 is no power of two
    (one_layer_model(act_e=40), "no"),                         # exponent out of range
], ids=["power-of-two", "brecq-no-model", "non-integer-exponent", "act-exponent-range"])
def test_pot_column_says_whether_every_scale_is_a_power_of_two(model, expected):
  """The record's ``power_of_two`` comes from ``quantized.check_power_of_two``, not from
  the mere existence of a model, and the results table shows it."""
  if model is not None and expected == "no":
    with pytest.raises(AssertionError):
      quantized.check_power_of_two(model)
  pot = methods.power_of_two(model)
  assert pot is (expected == "yes")
  row = dict(method="m", wbits=4, abits=4, top1=50.0, top5=90.0, n=10, power_of_two=pot)
  assert f"| m | W4A4 | 50.00 |  |  |  | {expected} |" in report.results_table([row])


def _record(top1_rapq):
  res = [dict(method="fp", wbits=None, abits=None, top1=81.0, top5=99.0, n=100),
         dict(method="rapq", wbits=4, abits=4, top1=top1_rapq, top5=98.0, n=100,
              agreement=93.1, kl_to_reference=0.25, power_of_two=True, wall_seconds=12.0, seconds_per_iter={"u": 0.01},
              search={"after": dict(before=0.3, after=0.2, sweeps=2, moved=["u/a:out+1"],
                                    seconds=1.0)}, ptq=dict(weight_iters=10, act_iters=2, batch_size=8))]
  return dict(config=dict(model="m", calibration_size=64, seed=1), results=res,
              **report.environment())


def test_results_doc_is_regenerated_identically(tmp_path):
  (tmp_path / "a_run.json").write_text(json.dumps(_record(78.5)))
  first = results_doc.render(tmp_path)
  assert results_doc.render(tmp_path) == first
  assert "| rapq | W4A4 | 78.50 | 2.50 | 93.10 | 0.2500 | yes | 12 | 10.0 ms |" in first
  (tmp_path / "a_run.json").write_text(json.dumps(_record(77.0)))
  assert results_doc.render(tmp_path) != first


def test_results_doc_reads_records_with_old_setting_names(tmp_path):
  """Committed result files record ``ptq`` with the names of their time (iters_w/iters_a)."""
  old = _record(78.5)
  old["results"][1]["ptq"] = dict(iters_w=10, iters_a=2, batch_size=8)
  (tmp_path / "old.json").write_text(json.dumps(old))
  (tmp_path / "new.json").write_text(json.dumps(_record(78.5)))
  text = results_doc.render(tmp_path)
  assert text.count("10/2 weight/activation iterations per unit") == 2
  assert text.count("| 10/2 |") == 2


def test_results_doc_shows_each_rows_protocol(tmp_path):
  """The summary says per row which protocol it used; a record from before the field
  existed ran the only one there was, 'strict'."""
  record = _record(78.5)
  official = dict(record["results"][1], method="rapq_official", top1=77.0,
                  ptq=dict(record["results"][1]["ptq"], protocol="official"))
  record["results"].append(official)
  (tmp_path / "a_run.json").write_text(json.dumps(record))
  text = results_doc.render(tmp_path)
  assert "| rapq | 78.50 | strict | 10/2 |" in text
  assert "| rapq_official | 77.00 | official | 10/2 |" in text
  assert "Protocol (README, 'Protocols'): rapq_official official, the others strict." in text


def test_results_doc_shows_each_rows_rounding_rate(tmp_path):
  """The summary gives the rate the rounding logits learned at: lr_w scaled to the
  budget, lr_w as given in a record from before ``lr_w_ref_iters``, blank without
  reconstruction."""
  record = _record(78.5)
  rapq = record["results"][1]
  record["results"] += [
      dict(rapq, method="scaled", ptq=dict(rapq["ptq"], lr_w=1e-3, lr_w_ref_iters=20000)),
      dict(rapq, method="long", ptq=dict(rapq["ptq"], weight_iters=40000, lr_w_ref_iters=20000)),
      dict(rapq, method="naive", ptq=dict(rapq["ptq"], reconstruct=False))]
  (tmp_path / "a_run.json").write_text(json.dumps(record))
  text = results_doc.render(tmp_path)
  assert "| rapq | 78.50 | strict | 10/2 | 0.001 |" in text
  assert "| scaled | 78.50 | strict | 10/2 | 2 |" in text
  assert "| long | 78.50 | strict | 10/2 | 0.001 |" in text
  assert "| naive | 78.50 | strict | 10/2 |  |" in text


def test_results_doc_says_which_images_the_search_scored(tmp_path):
  record = _record(78.5)
  record["results"][1]["search"]["after"].update(
      capped=True, images=dict(rows=[48, 64], reconstruction_rows=[0, 48], held_out=True))
  (tmp_path / "a_run.json").write_text(json.dumps(record))
  assert ("- rapq W4A4, after reconstruction: 0.3000 -> 0.2000 in 2 sweep(s) (stopped at its "
          "sweep limit, still moving), 1 exponent(s) moved, 1.0 s; scored on 16 held-out "
          "calibration images (rows 48-63; reconstruction used rows 0-47)"
          in results_doc.render(tmp_path))


def test_results_doc_names_a_search_objective_other_than_the_kl(tmp_path):
  record = _record(78.5)
  record["results"][1]["ptq"] = {"search_objective": "ce"}
  (tmp_path / "a_run.json").write_text(json.dumps(record))
  text = results_doc.render(tmp_path)
  assert "KL to them unless the line names another" in text
  assert "- rapq W4A4, after reconstruction: ce 0.3000 -> 0.2000 in 2 sweep(s)" in text


def test_merge_results_joins_runs_split_across_processes(tmp_path):
  w4, w2 = _record(78.5), _record(70.0)
  w2["results"][1].update(wbits=2)
  merged = merge_results.merge([(w4, "TF32"), (w2, None)], note="two processes",
                               device_kind="Some GPU")
  assert [(r["method"], r["wbits"]) for r in merged["results"]] == [
      ("fp", None), ("rapq [TF32]", 4), ("rapq", 2)]
  assert merged["machine"]["device_kind"] == "Some GPU" and merged["note"] == "two processes"
  (tmp_path / "merged.json").write_text(json.dumps(merged))
  text = results_doc.render(tmp_path)
  assert "| rapq [TF32] | W4A4 | 78.50 |" in text and "two processes" in text
  assert "(Some GPU" in text


def test_merge_results_refuses_runs_of_another_config():
  other = _record(70.0)
  other["config"]["seed"] = 2
  with pytest.raises(ValueError, match=r"input 2 differs from input 1 in config: \['seed'\]"):
    merge_results.merge([(_record(78.5), None), (other, None)])


def test_committed_results_doc_is_up_to_date():
  out = subprocess.run([sys.executable, "-m", "experiments.results_doc", "--check"], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr + out.stdout


def _run(args, workdir, **kw):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "experiments.run", *args, f"--workdir={workdir}"],
                        cwd=REPO, env=env, capture_output=True, text=True, **kw)


def test_environment_records_the_checkout_commit():
  git = report.environment()["git"]
  assert len(git["commit"]) == 40 and isinstance(git["dirty"], bool)


@pytest.mark.parametrize("args, message", [
    (["--config.ptq.no_such_field=1"], "--config.ptq.no_such_field: no such config field 'no_such_field'"),
    (["--config.no_such=1"], "--config.no_such: no such config field 'no_such'"),
    (["--config.wbits=9"], "wbits"),
    (["--methods", "rapq", "--bits", "4/9"], "4/9"),
    (["--config.matmul_precision=fast"], "config.matmul_precision='fast'"),
    # The given search reaches brecq over its preset (search='none'); float scales refuse it.
    (["--methods", "brecq", "--config.ptq.search=after"], "need learn_exponent=False and "
     "search='none'"),
])
def test_bad_flags_fail_before_any_output(tmp_path, args, message):
  out = _run(["--config", "fmnist_resnet", *args], tmp_path / "run", timeout=300)
  assert out.returncode != 0
  assert message in out.stderr
  assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow(seconds=25)
def test_bench_writes_per_unit_timings(tmp_path):
  """experiments.bench end to end on the small Fashion-MNIST ResNet, 2 timed steps."""
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--model", "fmnist_resnet",
                         "--image_size", "28", "--iters", "2", "--cache", "16",
                         "--batch_size", "8", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  assert record["units"] and {u["model"] for u in record["units"]} == {"fmnist_resnet"}
  for u in record["units"]:
    assert u["weight_s_per_iter"] > 0 and u["compile_s"] > 0
  assert record["machine"]["device_kind"]
