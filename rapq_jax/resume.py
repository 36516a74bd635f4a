"""Resuming: a directory of finished pieces of one run, bound to the run's config.

``Store(directory)`` keeps one orbax checkpoint per name: JSON-able ``info`` and an
optional pytree of arrays. Orbax writes into ``<name>.orbax-checkpoint-tmp`` and renames
it when complete, so ``load`` never reads a half-written entry: it returns None for an
absent or unfinished one (a later ``save`` replaces the leftover). ``Store.bind`` ties
the directory to a config; ``check_same_config`` is the comparison, with an error that
names every differing field.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

_MISSING = "<missing>"


class ConfigMismatchError(ValueError):
  """A directory holds the state of a run with another config. ``differences``:
  ``{'dotted.field': (stored value, given value)}``."""

  def __init__(self, where: str, differences: dict, accepted: str):
    self.differences = differences
    fields = "; ".join(f"{k} = {a!r} there, {b!r} now" for k, (a, b) in differences.items())
    super().__init__(f"{where} belongs to a different config ({fields}). Accepted: {accepted}.")


def _flat(tree, prefix=""):
  """``{'a.b': leaf}`` of nested JSON dicts."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def check_same_config(stored: dict, given: dict, where: str, accepted: str) -> None:
  """Raises ``ConfigMismatchError`` unless the JSON forms of the two configs are equal."""
  a, b = _flat(json.loads(json.dumps(stored))), _flat(json.loads(json.dumps(given)))
  diffs = {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
           if a.get(k, _MISSING) != b.get(k, _MISSING)}
  if diffs:
    raise ConfigMismatchError(where, diffs, accepted)


class Store:
  """Finished pieces of one run in ``directory`` (created on the first save)."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory).absolute()

  def load(self, name: str) -> tuple[dict, dict | None] | None:
    """``(info, arrays)`` saved under ``name`` (arrays as jax arrays, None if none were
    saved), or None when no finished entry exists."""
    import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
    path = self.directory / name
    if not path.is_dir() or not ocp.utils.is_checkpoint_finalized(path):
      return None
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      args = {"info": ocp.args.JsonRestore()}
      if (path / "arrays").is_dir():
        args["arrays"] = ocp.args.PyTreeRestore()
      restored = ckpt.restore(path, ocp.args.Composite(**args))
    arrays = restored.get("arrays")
    return restored["info"], None if arrays is None else jax.tree.map(jnp.asarray, arrays)

  def save(self, name: str, info: dict, arrays: dict | None = None) -> None:
    """Saves ``info`` (JSON-able) and ``arrays`` (a pytree of arrays) under ``name``,
    atomically."""
    import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
    items = {"info": ocp.args.JsonSave(info)}
    if arrays is not None:
      items["arrays"] = ocp.args.PyTreeSave(jax.tree.map(np.asarray, arrays))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(self.directory / name, ocp.args.Composite(**items), force=True)

  def bind(self, config: dict) -> None:
    """Records ``config`` on first use; afterwards raises ``ConfigMismatchError`` if
    ``config`` differs from the recorded one."""
    done = self.load("config")
    if done is None:
      self.save("config", config)
    else:
      check_same_config(done[0], config, f"store {self.directory}",
                        "the config it was started with, or another directory")
