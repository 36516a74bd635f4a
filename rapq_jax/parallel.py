"""Data parallelism over all devices: a 1-D mesh and arrays split along their rows.

Every helper spans ``jax.devices()``: the local devices, or every host's devices after
``jax.distributed.initialize()``. A sharded array's row count must be a multiple of the
device count, so ``shard_rows`` pads with zero rows and callers keep the true count.
On one device every helper leaves the computation unchanged.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


def _sharding(spec: PartitionSpec) -> NamedSharding:
  return NamedSharding(Mesh(np.asarray(jax.devices()), (AXIS,)), spec)


def row_sharding() -> NamedSharding:
  """Sharding that splits axis 0 evenly over a 1-D mesh (``AXIS``) of all devices."""
  return _sharding(PartitionSpec(AXIS))


def replicated() -> NamedSharding:
  """Sharding that keeps a full copy on every device of the mesh."""
  return _sharding(PartitionSpec())


def replicate(tree):
  """A pytree of arrays with a full copy on every device of the mesh. Jitted functions
  key their compilations on input placement, so states and parameters placed here
  before a loop match the placement of the loop's own outputs (one compilation)."""
  return jax.device_put(tree, replicated())


def check_batch(batch_size: int) -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the devices."""
  devices = jax.device_count()
  if batch_size % devices:
    raise ValueError(f"batch size {batch_size} is not divisible by the device count "
                     f"{devices}: every device takes an equal share of each batch")


def pad_rows(x):
  """x [N, ...] (numpy or jax) zero-padded along axis 0 to the next multiple of the
  device count; x itself when N is one already."""
  pad = -x.shape[0] % jax.device_count()
  if not pad:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def shard_rows(x) -> jax.Array:
  """x [N, ...] padded (``pad_rows``) and placed split along rows over all devices."""
  return jax.device_put(pad_rows(x), row_sharding())


def constrain_rows(x: jax.Array) -> jax.Array:
  """Inside jit: x [B, ...] (B a multiple of the device count) computed split along rows."""
  return jax.lax.with_sharding_constraint(x, row_sharding())


def map_rows(fn, x, chunk: int) -> jax.Array:
  """A row-wise ``fn`` over x [N, ...] in chunks of ``chunk`` rows, each chunk split
  over the devices; returns fn's rows [N, ...] concatenated."""
  out = []
  for i in range(0, x.shape[0], chunk):
    part = x[i:i + chunk]
    y = fn(shard_rows(part))
    out.append(y if y.shape[0] == part.shape[0] else y[:part.shape[0]])
  return jnp.concatenate(out)
