"""Resuming: a directory of finished pieces of one run, bound to the run's config.

``Store(directory)`` keeps one orbax checkpoint per name: JSON-able ``info`` and an
optional pytree of arrays. Orbax writes into ``<name>.orbax-checkpoint-tmp`` and renames
it when complete, so ``load`` never reads a half-written entry: it returns None for an
absent or unfinished one (a later ``save`` replaces the leftover). Every entry carries
the sha256 of its info, of each array and of the config the store is bound to
(``save_checked``); ``load`` verifies them and
raises ``integrity.IntegrityError`` naming the entry when anything differs or cannot be
read, so damaged state is never used (``ptq.quantize_network`` recomputes such a unit).
``Store.bind`` ties the directory to a config; ``check_same_config`` is the comparison,
with an error that names every differing field.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import integrity

_MISSING = "<missing>"
CHECKSUMS = "checksums"
ARRAYS = "arrays"


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


def save_checked(path, documents: dict, arrays: dict | None = None) -> None:
  """Orbax checkpoint at ``path`` (replaced if present, committed atomically) of JSON-able
  ``documents`` (``{item name: JSON}``) and an optional pytree of ``arrays``, with an item
  ``checksums`` holding the sha256 of each document and array."""
  import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
  documents = json.loads(json.dumps(documents))          # the form a restore returns
  items = {k: ocp.args.JsonSave(v) for k, v in documents.items()}
  sums = {"documents": {k: integrity.json_digest(v) for k, v in documents.items()},
          ARRAYS: None}
  if arrays is not None:
    arrays = jax.tree.map(np.asarray, arrays)
    items[ARRAYS] = ocp.args.PyTreeSave(arrays)
    sums[ARRAYS] = integrity.digests(arrays)
  items[CHECKSUMS] = ocp.args.JsonSave(sums)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(pathlib.Path(path).absolute(), ocp.args.Composite(**items), force=True)


def load_checked(path) -> tuple[dict, dict | None]:
  """``(documents, arrays)`` of a ``save_checked`` checkpoint (arrays as numpy, None if
  none were saved), verified against its checksums. Raises ``integrity.IntegrityError``
  naming ``path`` when it cannot be read, lacks checksums, or anything differs."""
  import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path).absolute()
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      sums = ckpt.restore(path, ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))
      sums = sums[CHECKSUMS]
      if not isinstance(sums, dict) or not isinstance(sums.get("documents"), dict):
        raise integrity.IntegrityError(f"{path}: no checksum manifest")
      args = {k: ocp.args.JsonRestore() for k in sums["documents"]}
      if sums.get(ARRAYS) is not None:
        args[ARRAYS] = ocp.args.PyTreeRestore()
      restored = ckpt.restore(path, ocp.args.Composite(**args))
  except integrity.IntegrityError:
    raise
  except Exception as err:  # pylint: disable=broad-except  (any unreadable byte is damage)
    raise integrity.IntegrityError(
        f"{path}: cannot be read ({type(err).__name__}: {str(err)[:200]}); the checkpoint is "
        "damaged or was written without checksums") from err
  documents = {k: restored[k] for k in sums["documents"]}
  for k, v in documents.items():
    integrity.verify_json(v, sums["documents"][k], path, f"its {k!r} document")
  arrays = None
  if sums.get(ARRAYS) is not None:
    arrays = jax.tree.map(np.asarray, restored[ARRAYS])
    integrity.verify(arrays, sums[ARRAYS], path)
  return documents, arrays


class Store:
  """Finished pieces of one run in ``directory`` (created on the first save)."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory).absolute()
    self.config_digest = None      # sha256 of the bound config, recorded in every entry

  def load(self, name: str) -> tuple[dict, dict | None] | None:
    """``(info, arrays)`` saved under ``name`` (arrays as jax arrays, None if none were
    saved), or None when no finished entry exists. Raises ``integrity.IntegrityError``
    for a damaged entry."""
    import orbax.checkpoint as ocp   # pylint: disable=import-outside-toplevel
    path = self.directory / name
    if not path.is_dir() or not ocp.utils.is_checkpoint_finalized(path):
      return None
    documents, arrays = load_checked(path)
    if "info" not in documents:
      raise integrity.IntegrityError(f"{path}: no 'info' document")
    owner = documents.get("owner", {}).get("config_sha256")
    if name != "config" and self.config_digest is not None and owner != self.config_digest:
      raise integrity.IntegrityError(f"{path}: saved for another config than the one this "
                                     f"store is bound to (config sha256 {owner})")
    return documents["info"], None if arrays is None else jax.tree.map(jnp.asarray, arrays)

  def save(self, name: str, info: dict, arrays: dict | None = None) -> None:
    """Saves ``info`` (JSON-able) and ``arrays`` (a pytree of arrays) under ``name``,
    atomically, with their checksums."""
    owner = {} if self.config_digest is None else {"owner": {"config_sha256": self.config_digest}}
    save_checked(self.directory / name, {"info": info, **owner}, arrays)

  def bind(self, config: dict, upgrade=None) -> None:
    """Records ``config`` on first use; afterwards raises ``ConfigMismatchError`` if
    ``config`` differs from the recorded one as ``upgrade`` (``dict -> dict``, e.g.
    renaming old fields; default: as recorded) reads it (``IntegrityError`` if the record
    is damaged: which config the directory belongs to is then unknown). Entries carry
    the digest of the record as written, so those of an older version stay valid."""
    done = self.load("config")
    if done is None:
      self.save("config", config)
      recorded = config
    else:
      recorded = done[0]
      check_same_config((upgrade or dict)(recorded), config, f"store {self.directory}",
                        "the config it was started with, or another directory")
    self.config_digest = integrity.json_digest(json.loads(json.dumps(recorded)))
