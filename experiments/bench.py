r"""Speed benchmark of reconstruction: seconds per iteration per unit shape, compile time,
and optionally the whole pipeline's wall time and peak memory. Writes JSON.

  python -m experiments.bench                                  # CIFAR ResNet-20 units
  python -m experiments.bench --imagenet                       # + ResNet-18 / MobileNetV2 blocks at 224x224
  python -m experiments.bench --pipeline="--config cifar10_resnet20 --methods rapq --bits 4/4"

Unit inputs are random tensors of the unit's real input shape (weights random too:
speed does not depend on their values). Each distinct unit shape is measured once.
It is the command used to judge speed; it is not a timed test.
"""
import json
import pathlib
import resource
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from experiments import report
from rapq_jax import config as ptq_config_lib
from rapq_jax import adapter, integrity, ptq, reconstruct
from rapq_jax.network import unit_apply
from rapq_jax.models import get_model

_MODEL = flags.DEFINE_string("model", "cifar_resnet20", "Model whose units are measured.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Input height/width for --model.")
_IMAGENET = flags.DEFINE_bool("imagenet", False, "Also measure ResNet-18 and MobileNetV2 at 224x224.")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed iterations per phase and unit.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Reconstruction batch size.")
_CACHE = flags.DEFINE_integer("cache", 256, "Cached calibration samples per unit.")
_PIPELINE = flags.DEFINE_string("pipeline", None, "Arguments of an experiments.run call to time "
                                "as a whole (wall time and peak RSS).")
_OUT = flags.DEFINE_string("out", None, "Output JSON (default results/bench_<model>.json).")


def _time_phase(step, state, *inputs):
  """Seconds of the first call of a phase's ``step`` (compilation) and seconds per
  iteration of the next ``--iters``."""
  t0 = time.perf_counter()
  state, loss = step(state, *inputs, 0)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for it in range(1, _ITERS.value + 1):
    state, loss = step(state, *inputs, it)
  loss.block_until_ready()
  return compile_s, (time.perf_counter() - t0) / _ITERS.value


def _time_unit(unit, params, bn, shape, specs, cfg, key, p):
  """Compile seconds and seconds per iteration of the weight and activation steps with
  the reconstruction loss ``|y - y_t|**p``."""
  wspecs, aspecs = specs
  xs = jax.random.normal(key, (_CACHE.value,) + tuple(shape[1:]), jnp.float32)
  fns = ptq.unit_fns(unit, {unit.name: specs}, cfg)
  ys = fns.fp(params, xs)
  wstates, astates = fns.init(params, xs)
  n = xs.shape[0]  # real rows; placing pads them to a multiple of the device count
  xs, ys, (params, bn, wstates, astates) = reconstruct.place(
      xs, ys, (params, bn, wstates, astates))
  shape_unit = reconstruct.structural(unit)
  ws_t, as_t = tuple(sorted(wspecs.items())), tuple(sorted(aspecs.items()))
  learn_v = any("v" in s for s in wstates.values())
  weights = reconstruct.weight_phase(shape_unit, ws_t, as_t, cfg, p, learn_v, n)
  compile_s, weight_s = _time_phase(
      weights.step, weights.init(wstates), astates, params, bn, xs, ys, key)
  act_s = 0.0
  if aspecs:
    hard = {r: {k: v for k, v in s.items() if k != "v"} for r, s in wstates.items()}
    acts = reconstruct.act_phase(shape_unit, ws_t, as_t, cfg, p, n)
    act_compile_s, act_s = _time_phase(
        acts.step, acts.init(astates, hard), hard, params, xs, ys, key)
    compile_s += act_compile_s
  return compile_s, weight_s, act_s


def bench_model(name: str, size: int, channels: int) -> list[dict]:
  """Per distinct unit shape of ``name``: compile time and s/iter of both phases."""
  model = get_model(name)
  key = jax.random.PRNGKey(0)
  variables = model.init(key, jnp.zeros((1, size, size, channels)))
  images = jax.random.normal(key, (adapter.VERIFY_SAMPLES, size, size, channels))
  net = adapter.read_model(model, variables, images, apply_kwargs={"train": False})
  cfg = ptq_config_lib.for_method("rapq", batch_size=_BATCH.value,
                                  weight_iters=max(_ITERS.value, 1), exp_warm_iters=0)
  specs = ptq.unit_specs(net, cfg)
  x = jnp.zeros((1, size, size, channels))
  rows, seen = [], set()
  for unit in tqdm(net.units, desc=name, disable=None):
    shape = x.shape
    x, _ = unit_apply(unit, net.params[unit.name], x)
    ident = (reconstruct.structural(unit), shape)
    if ident in seen:
      continue
    seen.add(ident)
    # The unit's own loss exponent, as the pipeline takes it (BN-derived: 1.1 for these
    # BN layers, 2 for the classifier).
    p = ptq.unit_lp(net, unit.name, cfg)
    compile_s, weight_s, act_s = _time_unit(unit, net.params[unit.name], net.bn_targets[unit.name],
                                            shape, specs[unit.name], cfg, key, p)
    rows.append(dict(model=name, name=unit.name, kind=unit.kind, input_shape=list(shape[1:]), p=p,
                     weight_s_per_iter=weight_s, act_s_per_iter=act_s, compile_s=compile_s))
    tqdm.write(f"{name}/{unit.name:>14} {str(list(shape[1:])):>16} p={p:g}: weight {weight_s * 1e3:7.2f} "
               f"ms/it, act {act_s * 1e3:7.2f} ms/it, compile {compile_s:5.1f} s")
  return rows


def bench_pipeline(args: str) -> dict:
  """Wall time and peak RSS of one ``experiments.run`` invocation in a subprocess."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "experiments.run", *shlex.split(args)], check=True)
  wall = time.perf_counter() - start
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return dict(what=f"python -m experiments.run {args}", wall_seconds=wall,
              peak_rss_mb=peak_kb / 1024)


def main(argv):
  del argv
  units = bench_model(_MODEL.value, _SIZE.value, 1 if _MODEL.value.startswith("fmnist") else 3)
  if _IMAGENET.value:
    for name in ("resnet18", "mobilenetv2"):
      units += bench_model(name, 224, 3)
  record = dict(units=units, iters=_ITERS.value, batch_size=_BATCH.value, **report.environment())
  if _PIPELINE.value:
    record["pipeline"] = bench_pipeline(_PIPELINE.value)
  out = pathlib.Path(_OUT.value or f"results/bench_{_MODEL.value}.json")
  integrity.atomic_write(out, json.dumps(record, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
