"""Random Flax variables for tiny test networks, shared by the test modules."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from rapq_jax import adapter, config, integer, ptq, quantized


def random_variables(model, hw: int, seed: int = 0, init_kwargs=None) -> dict:
  """He-scaled random kernels and random BN statistics, without ``model.init``.
  ``init_kwargs``: extra arguments of the model's ``__call__`` (default ``train=False``)."""
  kwargs = {"train": False} if init_kwargs is None else init_kwargs
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs),
                          jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: random_array(path[-1].key, leaf.shape, rng), shapes)


def random_array(name: str, shape, rng: np.random.Generator) -> jax.Array:
  """A random value for the variable called ``name`` (its last path element)."""
  if name == "kernel":
    a = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
  elif name == "scale":
    a = rng.uniform(0.5, 1.5, size=shape)
  elif name == "var":
    a = rng.uniform(0.3, 3.0, size=shape)
  else:
    a = rng.normal(size=shape) * 0.2
  return jnp.asarray(a, jnp.float32)


def folded(model, variables, hw: int, channels: int = 3):
  """The folded ``Network`` of a ``rapq_jax.models`` network (called with ``train=False``),
  read by the adapter from random images."""
  images = jax.random.normal(jax.random.PRNGKey(0), (adapter.VERIFY_SAMPLES, hw, hw, channels))
  return adapter.read_model(model, variables, images, apply_kwargs={"train": False})


def quantize_to_integers(net, images, **overrides):
  """RAPQ with the search after reconstruction on a tiny budget (8 / 4 steps per unit
  unless ``overrides`` say otherwise, 8-image batches, 16 held-out search images);
  asserts every scale is a power of two and integer-only inference equals the simulation
  on the first 8 images. Returns the integer ``Program``."""
  cfg = config.for_method("rapq", **{**dict(weight_iters=8, act_iters=4, batch_size=8,
                                            search="after", search_samples=16), **overrides})
  result = ptq.quantize_network(net, images, cfg, progress=False)
  quantized.check_power_of_two(result.model)
  program = integer.lower(result.model)
  chex.assert_trees_all_equal(integer.apply(program, images[:8]), result.apply(images[:8]))
  return program
