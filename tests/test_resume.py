"""Specification of resuming (rapq_jax.resume, ``quantize_network(store=...)`` and
``python -m experiments.run --workdir``): finished units are loaded, not re-learned; a
run resumed after a crash ends bit-identical to an uninterrupted one (a job killed by
SIGKILL: tests/test_processes.py); nothing unfinished is read; a directory of another
config is refused, naming the differing fields.
"""
import dataclasses
import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
import damage
from nets import folded, random_variables

from rapq_jax import config, integrity, ptq, resume
from rapq_jax.models.cifar_resnet import CifarResNet

HW, N_CALIB = 16, 64
# search='both' so the search before reconstruction is stored and loaded too.
CFG = config.for_method("rapq", weight_iters=20, act_iters=5, batch_size=8, search_samples=32,
                        search_sweeps=1, search="both")


@pytest.fixture(scope="module")
def tiny():
  model = CifarResNet(num_blocks=1)
  net = folded(model, random_variables(model, HW), HW)
  calib = jax.random.normal(jax.random.PRNGKey(0), (N_CALIB, HW, HW, 3), jnp.float32)
  return net, calib


@pytest.fixture(scope="module")
def reference(tiny):
  """The uninterrupted run, without a store."""
  net, calib = tiny
  return ptq.quantize_network(net, calib, CFG, progress=False)


def _counting(monkeypatch, fail_after=None):
  """Counts reconstructions (and searches before them); the call after ``fail_after``
  reconstructions raises, as a crash would."""
  calls = {"units": [], "search_before": 0}
  reconstruct, run_search = ptq.reconstruct_unit, ptq._run_search

  def counted(unit, *args, **kw):
    if fail_after is not None and len(calls["units"]) == fail_after:
      raise KeyboardInterrupt("simulated crash")
    calls["units"].append(unit.name)
    return reconstruct(unit, *args, **kw)

  def counted_search(*args, weights, **kw):
    calls["search_before"] += weights
    return run_search(*args, weights=weights, **kw)

  monkeypatch.setattr(ptq, "reconstruct_unit", counted)
  monkeypatch.setattr(ptq, "_run_search", counted_search)
  return calls


def _timeless(entries: dict) -> dict:
  return {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in entries.items()}


def _assert_same_result(a, b):
  """Bit-identical states and integers; equal reports apart from timings."""
  chex.assert_trees_all_equal(a.states, b.states)
  chex.assert_trees_all_equal(a.model.weights, b.model.weights)
  chex.assert_trees_all_equal(a.model.acts, b.model.acts)
  assert _timeless(a.report["units"]) == _timeless(b.report["units"])
  assert _timeless(a.report["search"]) == _timeless(b.report["search"])


@pytest.mark.slow(seconds=17)
def test_second_run_loads_every_unit(tiny, tmp_path, monkeypatch):
  net, calib = tiny
  store = resume.Store(tmp_path)
  first = ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  calls = _counting(monkeypatch)
  second = ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  assert calls == {"units": [], "search_before": 0}
  _assert_same_result(first, second)
  assert second.report["units"] == first.report["units"]  # timings of the first run kept


def test_resumed_after_crash_equals_uninterrupted_run(tiny, reference, tmp_path, monkeypatch):
  net, calib = tiny
  store = resume.Store(tmp_path)
  with monkeypatch.context() as m:
    _counting(m, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
      ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  names = [u.name for u in net.units]
  # A write of the third unit killed half-way leaves orbax's temporary directory.
  junk = tmp_path / f"unit_{names[2]}.orbax-checkpoint-tmp"
  junk.mkdir()
  (junk / "_CHECKPOINT_METADATA").write_text("{half")
  calls = _counting(monkeypatch)
  resumed = ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  assert calls == {"units": names[2:], "search_before": 0}
  _assert_same_result(reference, resumed)
  np.testing.assert_array_equal(resumed.apply(calib[:8]), reference.apply(calib[:8]))


@pytest.mark.slow(seconds=20)
def test_official_protocol_resumes_in_its_activation_pass(tiny, tmp_path, monkeypatch):
  """The 'official' protocol reconstructs every unit's weights, then every unit's
  activations. Killed in the activation pass, a resumed run loads the whole weight pass
  and the finished activation stages, computes the rest and ends bit-identical to an
  uninterrupted run."""
  net, calib = tiny
  cfg = dataclasses.replace(CFG, protocol="official", search="none")
  reference = ptq.quantize_network(net, calib, cfg, progress=False)
  names = [u.name for u in net.units]                  # the stem is not reconstructed under 'official'
  store = resume.Store(tmp_path)
  with monkeypatch.context() as m:
    _counting(m, fail_after=len(names))     # 4 weight stages, the first activation stage
    with pytest.raises(KeyboardInterrupt):
      ptq.quantize_network(net, calib, cfg, progress=False, store=store)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["config", f"unit_{names[1]}"] + [f"weights_{u}" for u in names[1:]])
  calls = _counting(monkeypatch)
  resumed = ptq.quantize_network(net, calib, cfg, progress=False, store=store)
  assert calls == {"units": names[2:-1], "search_before": 0}   # the classifier has no acts
  _assert_same_result(reference, resumed)
  assert resumed.report["protocol"] == reference.report["protocol"]


def test_store_ignores_unfinished_entries(tmp_path):
  store = resume.Store(tmp_path)
  (tmp_path / "u.orbax-checkpoint-tmp").mkdir()
  assert store.load("u") is None and store.load("absent") is None
  arrays = {"w": {"conv": {"log2s": jnp.arange(3.0)}}, "a": {}}
  store.save("u", {"p": 1.1, "history": [[1, 0.5]]}, arrays)
  info, loaded = store.load("u")
  assert info == {"p": 1.1, "history": [[1, 0.5]]}
  chex.assert_trees_all_equal(loaded, arrays)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see damage.py
def test_damaged_unit_is_computed_again_never_used(tiny, reference, tmp_path, monkeypatch):
  """One flipped bit in a finished unit's array data: the resume names the damaged entry,
  recomputes exactly that unit and ends bit-identical to the uninterrupted run."""
  net, calib = tiny
  store = resume.Store(tmp_path)
  ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  name = [u.name for u in net.units][1]
  data = damage.largest_file(tmp_path / f"unit_{name}" / "arrays" / "d")
  damage.flip(data, data.stat().st_size // 2)
  with pytest.raises(integrity.IntegrityError, match=rf"unit_{name}: (checksum mismatch|cannot)"):
    store.load(f"unit_{name}")
  calls = _counting(monkeypatch)
  with pytest.warns(RuntimeWarning, match=rf"unit_{name}.*computing unit_{name} again"):
    resumed = ptq.quantize_network(net, calib, CFG, progress=False, store=store)
  assert calls == {"units": [name], "search_before": 0}
  _assert_same_result(reference, resumed)
  assert store.load(f"unit_{name}") is not None          # replaced by a sound entry


def test_damaged_config_record_is_refused(tmp_path):
  store = resume.Store(tmp_path)
  store.bind({"a": 1})
  info = tmp_path / "config" / "info" / "metadata"
  info.write_text(info.read_text().replace("1", "2"))
  with pytest.raises(integrity.IntegrityError, match="config: checksum mismatch of its 'info'"):
    store.bind({"a": 1})


def test_entry_of_another_config_is_refused(tmp_path):
  """A unit entry copied from a store of another config is never loaded as this one's."""
  a, b = resume.Store(tmp_path / "a"), resume.Store(tmp_path / "b")
  a.bind({"seed": 1})
  b.bind({"seed": 2})
  a.save("unit_x", {"p": 2.0}, {"t": jnp.ones(3)})
  assert a.load("unit_x")[0] == {"p": 2.0}
  shutil.copytree(tmp_path / "a" / "unit_x", tmp_path / "b" / "unit_x")
  with pytest.raises(integrity.IntegrityError, match="unit_x: saved for another config"):
    b.load("unit_x")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see damage.py
def test_every_flip_in_a_unit_store_is_detected_or_harmless(tmp_path):
  arrays = {"w": {"conv": {"log2s": jnp.arange(-3.0, 3.0), "alpha": jnp.linspace(-1, 1, 64)
                           .reshape(4, 4, 1, 4)}}, "a": {"out": {"t": jnp.float32(-2.0)}}}
  info = {"seconds": 1.5, "p": 2.4, "history": {"weights": [[1, 0.25]]}}
  resume.Store(tmp_path).save("unit_x", info, arrays)

  def load(copy):
    loaded = resume.Store(copy.parent).load(copy.name)
    return None if loaded is None else {"info": loaded[0], "arrays": loaded[1]}

  seen = damage.assert_every_flip_detected_or_harmless(tmp_path / "unit_x", load,
                                                       {"info": info, "arrays": arrays})
  assert "detected" in seen


def test_store_of_another_config_is_refused(tiny, tmp_path):
  net, calib = tiny
  resume.Store(tmp_path).bind(dataclasses.asdict(CFG))
  other = dataclasses.replace(CFG, weight_iters=21)
  with pytest.raises(resume.ConfigMismatchError, match=r"weight_iters = 20 there, 21 now"):
    ptq.quantize_network(net, calib, other, progress=False, store=resume.Store(tmp_path))


def _with_old_names(cfg, **changes):
  """The config record an older version wrote: the fields under their old names, the
  fields added since (``config.ADDED``) absent."""
  old_name = {new: old for old, new in config.RENAMED.items()}
  return {old_name.get(k, k): v for k, v in dataclasses.asdict(cfg).items()
          if k not in config.ADDED} | changes


def test_store_of_an_older_version_is_read(tiny, tmp_path):
  """A store whose config record holds old field names (``config.RENAMED``), with a unit
  saved as that version saved it: the unit loads; ``quantize_network`` reads the record
  by the names now (its mismatch error says weight_iters); without the upgrade, refused."""
  cfg = dataclasses.replace(CFG, **config.ADDED)   # what the older version ran
  old = resume.Store(tmp_path)
  old.bind(_with_old_names(cfg))
  old.save("unit_x", {"p": 2.0}, {"t": jnp.ones(3)})
  new = resume.Store(tmp_path)
  new.bind(dataclasses.asdict(cfg), upgrade=config.current_names)
  assert new.load("unit_x")[0] == {"p": 2.0}
  with pytest.raises(resume.ConfigMismatchError, match=r"align_scales = '<missing>' there, "
                     r"'none' now; .*init_p = 2.4 there, '<missing>' now; iters_a = 5 there, "
                     r"'<missing>' now; iters_w = 20 there"):
    resume.Store(tmp_path).bind(dataclasses.asdict(cfg))
  resume.Store(tmp_path / "b").bind(_with_old_names(cfg, iters_w=21))
  with pytest.raises(resume.ConfigMismatchError, match=r"^[^;]*weight_iters = 21 there, 20 now"):
    ptq.quantize_network(*tiny, cfg, progress=False, store=resume.Store(tmp_path / "b"))
  # Its units were learned at the plain lr_w and nearest activation exponents on the
  # network as folded, and its search took single steps on reconstruction images: with
  # the defaults now the store is refused, naming those fields.
  with pytest.raises(resume.ConfigMismatchError, match=r"\(act_exp_init = 'nearest' there, "
                     r"'lp' now; align_scales = 'none' there, 'stream' now; lr_w_ref_iters "
                     r"= 0 there, 20000 now; search_holdout = False there, True now; "
                     r"search_reach = 1 there, 8 now\)"):
    resume.Store(tmp_path).bind(dataclasses.asdict(CFG), upgrade=config.current_names)


RECORDED = sorted(pathlib.Path(__file__).resolve().parents[1].glob("results/*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_config_of_every_recorded_version_reads_as_a_whole_config(path):
  """A store's config record is ``dataclasses.asdict`` of the PTQConfig that wrote it, as
  each result's ``ptq``: every committed result's, from every version that wrote one,
  names all fields now once upgraded (``config.current_names``), and they are valid. A
  field added without its ``config.ADDED`` entry fails here: stores and run directories
  of the versions before it could not be resumed."""
  fields = {f.name for f in dataclasses.fields(config.PTQConfig)}
  records = [r["ptq"] for r in json.loads(path.read_text()).get("results", []) if r.get("ptq")]
  for record in records:
    upgraded = config.current_names(record)
    assert set(upgraded) == fields, (sorted(fields - set(upgraded)), sorted(set(upgraded) - fields))
    config.PTQConfig(**upgraded)


def test_config_mismatch_names_every_field_and_what_is_accepted():
  with pytest.raises(ValueError) as err:
    resume.check_same_config({"a": 1, "ptq": {"p": 2.0, "gone": 0}}, {"a": 1, "ptq": {"p": 2.5}},
                             "run directory X", "the same config or a new --workdir")
  assert isinstance(err.value, resume.ConfigMismatchError)
  assert err.value.differences == {"ptq.gone": (0, "<missing>"), "ptq.p": (2.0, 2.5)}
  assert str(err.value) == ("run directory X belongs to a different config (ptq.gone = 0 there, "
                            "'<missing>' now; ptq.p = 2.0 there, 2.5 now). Accepted: the same "
                            "config or a new --workdir.")
  resume.check_same_config({"t": (1, 2)}, {"t": [1, 2]}, "X", "")  # JSON forms compare


# ------------------------------------------------------------------ python -m experiments.run

def test_run_refuses_a_workdir_of_another_config(tmp_path):
  args = [*cli.TINY, "--methods", "fp"]
  run_dir, log = tmp_path / "run", tmp_path / "run.log"
  cli.finish(cli.start(args, run_dir, log), log)
  # The lock file records the pid of the last process that held the directory: not state.
  state = lambda: {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
                   and p.name != integrity.LOCK_NAME}
  before = state()
  out = cli.finish(cli.start([*args, "--config.weight_iters=13"], run_dir, log), log, ok=False)
  assert ("belongs to a different config (weight_iters = 12 there, 13 now). Accepted: the "
          f"config in {run_dir / 'config.json'} (to resume that run) or a new --workdir") in out
  assert state() == before


def test_run_directory_of_an_older_version_is_resumed(tmp_path):
  """A run directory whose config.json predates a PTQConfig field (``config.ADDED``)
  binds to the same command now; another difference is still refused."""
  from experiments import job   # pylint: disable=import-outside-toplevel
  from experiments.configs import base   # pylint: disable=import-outside-toplevel
  cfg = base.get_base_config()
  old = json.loads(cfg.to_json_best_effort())
  for name in config.ADDED:
    del old["ptq"][name]
  (tmp_path / "config.json").write_text(json.dumps(old))
  job.open_workdir(tmp_path, cfg)
  cfg.weight_iters += 1
  with pytest.raises(resume.ConfigMismatchError, match=r"weight_iters = 2000 there, 2001 now"):
    job.open_workdir(tmp_path, cfg)
