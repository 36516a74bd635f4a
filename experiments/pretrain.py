r"""Trains a small FP32 classifier with BatchNorm on Fashion-MNIST and writes its checkpoint.

  python -m experiments.pretrain --config fmnist_resnet
  python -m experiments.pretrain --config fmnist_mobilenet --output_dir /tmp/ckpt

`--config` takes a name (`experiments/configs/pretrain_<name>.py`) or a config file
path; any field can be overridden as `--config.<field>=<value>`. Writes, each
atomically, `<output_dir>/<model>.npz`: a PyTorch-layout state dict that
`rapq_jax.convert.load_pretrained` reads, and `<model>.json`: the per-epoch log, the
test top-1 of the written checkpoint, seed, config, wall time and the environment
(`report.environment`: versions, machine, commit). The same seed on the same machine
gives the same weights.
"""
import functools
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any

from absl import app
from absl import flags
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from experiments import configs
from experiments import data as data_lib
from experiments import report
from rapq_jax import convert
from rapq_jax import integrity
from rapq_jax import evaluate as evaluate_lib
from rapq_jax.models import get_model, input_shape

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoints"


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, plus the BatchNorm running statistics."""
  batch_stats: Any


def create_train_state(model_name: str, tx: optax.GradientTransformation,
                       key: jax.Array) -> TrainState:
  """The model called `model_name`, freshly initialized from `key`, with optimizer `tx`."""
  image = jnp.zeros((1, *input_shape(model_name)), jnp.float32)
  model = get_model(model_name)
  variables = model.init(key, image, train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def optimizer(config: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay over `steps`; weight decay on kernels only."""
  warmup = int(config.warmup_epochs * steps / config.epochs)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, steps)
  kernels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == "kernel", params)
  return optax.adamw(schedule, weight_decay=config.weight_decay, mask=kernels)


@jax.jit
def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               key: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer step on float32 images [B, H, W, C] and int32 labels [B].

  BatchNorm normalizes with batch statistics and updates its running statistics;
  dropout draws from `key` folded with the step. Returns (new state, dict(loss mean,
  correct count)).
  """
  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(key, state.step)})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, dict(loss=loss, correct=jnp.sum(jnp.argmax(logits, -1) == labels))


def test_accuracy(model, variables: dict, images: np.ndarray, labels: np.ndarray,
                  config: ml_collections.ConfigDict, desc: str) -> dict:
  """dict(top1, top5, n) of `model` in eval mode on uint8 images, as `experiments.pipeline` measures it."""
  return evaluate_lib.evaluate(
      lambda x: model.apply(variables, x, train=False), images, labels,
      batch_size=config.eval_batch_size, desc=desc,
      preprocess=functools.partial(data_lib.normalize, mean=config.mean, std=config.std))


def train_and_evaluate(config: ml_collections.ConfigDict, output_dir: str | os.PathLike) -> dict:
  """Trains `config.model` and writes `<output_dir>/<model>.npz` and `.json`.

  Returns:
    The JSON record: log [{epoch, loss, train_top1, test_top1, seconds}], test_top1 and
    test_top5 of the written checkpoint (read back through `convert.load_pretrained`),
    params, seed, config, wall_seconds, checkpoint sha256 and bytes, and
    ``report.environment()`` (versions, machine, git).
  """
  start = time.perf_counter()
  root = config.data_dir or data_lib.FASHION_MNIST_DIR
  train_images, train_labels = data_lib.load_fashion_mnist("train", root)
  train_images, train_labels = train_images[:config.train_size], train_labels[:config.train_size]
  test_images, test_labels = data_lib.load_fashion_mnist("test", root)
  test_images, test_labels = test_images[:config.test_size], test_labels[:config.test_size]
  steps_per_epoch = len(train_images) // config.batch_size
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  tx = optimizer(config, steps_per_epoch * config.epochs)
  state, model = create_train_state(config.model, tx, init_key), get_model(config.model)
  order_rng = np.random.default_rng(config.seed)
  log = []
  for epoch in range(1, config.epochs + 1):
    epoch_start, metrics = time.perf_counter(), []
    batches = data_lib.train_batches(train_images, train_labels, config.batch_size, order_rng,
                                     mean=config.mean, std=config.std)
    with tqdm.tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
                   unit="step", disable=None) as bar:
      for images, labels in bar:
        state, step_metrics = train_step(state, images, labels, dropout_key)
        metrics.append(step_metrics)
        if len(metrics) % 50 == 0:
          bar.set_postfix(loss=f"{float(step_metrics['loss']):.4f}")
    metrics = jax.device_get(metrics)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    test = test_accuracy(model, variables, test_images, test_labels, config, f"test {epoch}")
    log.append(dict(
        epoch=epoch, loss=float(np.mean([m["loss"] for m in metrics])),
        train_top1=100.0 * sum(int(m["correct"]) for m in metrics) / (len(metrics) * config.batch_size),
        test_top1=test["top1"], seconds=time.perf_counter() - epoch_start))
    print(f"epoch {epoch}: loss {log[-1]['loss']:.4f}  train top-1 {log[-1]['train_top1']:.2f} %  "
          f"test top-1 {test['top1']:.2f} %", flush=True)

  output_dir = pathlib.Path(output_dir)
  checkpoint = output_dir / f"{config.model}.npz"
  state_dict = convert.to_state_dict(jax.device_get(variables), config.model)
  integrity.atomic_write(checkpoint, lambda f: np.savez(f, **state_dict))
  model, loaded = convert.load_pretrained(checkpoint, config.model)
  final = test_accuracy(model, loaded, test_images, test_labels, config, "checkpoint")
  record = dict(
      model=config.model, checkpoint=checkpoint.name,
      checkpoint_sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
      checkpoint_bytes=checkpoint.stat().st_size,
      params=sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
      test_top1=final["top1"], test_top5=final["top5"], test_images=final["n"],
      seed=config.seed, log=log, config=json.loads(config.to_json()),
      wall_seconds=time.perf_counter() - start, **report.environment())
  integrity.atomic_write(output_dir / f"{config.model}.json", json.dumps(record, indent=2) + "\n")
  return record


def _define_flags():
  """The command's flags; defined only when run as a program, so that importing this
  module next to experiments.run (which also has --config) does not clash."""
  config = config_flags.DEFINE_config_file(
      "config", None,
      f"Pretraining config name ({', '.join(configs.available_pretrain())}) or config file path.")
  output_dir = flags.DEFINE_string(
      "output_dir", str(CHECKPOINT_DIR), "Directory for <model>.npz and <model>.json.")
  return config, output_dir


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with a bare `--config NAME` (or `--config=NAME`) replaced by its pretraining config path."""
  return configs.resolve_config_argv(
      argv, lambda v: v if os.path.isfile(v) else configs.pretrain_config_path(v))


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    argv = resolve_config_argv(argv)
  except ValueError as e:
    sys.exit(f"FATAL Flags parsing error: --config: {e}")
  return app.parse_flags_with_usage(argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  record = train_and_evaluate(_CONFIG.value, _OUTPUT_DIR.value)
  print(f"{record['model']}: {record['params']} params, test top-1 {record['test_top1']:.2f} % "
        f"after {record['wall_seconds']:.0f} s -> {_OUTPUT_DIR.value}/{record['checkpoint']}")


if __name__ == "__main__":
  _CONFIG, _OUTPUT_DIR = _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
