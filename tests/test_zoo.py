"""BRECQ's model zoo in Flax: RegNetX-600MF, RegNetX-3.2GF and MnasNet against BRECQ's own
PyTorch definitions (reference logits recorded by tests/reference/make_zoo_logits.py),
BRECQ's checkpoint key layout, the stage tables, and the blocks' wiring on tiny variants."""
import pathlib
import re
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from rapq_jax import adapter
from rapq_jax.convert import CheckpointError, convert_state_dict, expected_layout, to_state_dict
from rapq_jax.models import MnasInvertedResidual, MnasNet, RegNetX, XBlock, get_model
from rapq_jax.models.mnasnet import mnasnet_depths
from rapq_jax.models.regnet import REGNETX_600M_STAGES, REGNETX_3200M_STAGES, regnetx_stages

REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / 'reference'
sys.path.insert(0, str(REFERENCE_DIR))
import zoo_weights  # noqa: E402  (tests/reference, numpy only)

ZOO = ('regnetx_600m', 'regnetx_3200m', 'mnasnet')
# Flax (XLA CPU) and PyTorch (oneDNN) sum the convolutions in different orders; over
# 20 .. 50 layers float32 rounding left 3.5e-7 .. 7.8e-7 of the largest |logit| (max abs
# 2.9e-6 RegNetX-600MF, 7.6e-6 RegNetX-3.2GF, 1.3e-5 MnasNet), a 13x margin.
RTOL_OF_SCALE = 1e-5


def reference(name: str) -> dict[str, np.ndarray]:
  with np.load(REFERENCE_DIR / f'zoo_{name}.npz') as archive:
    return {k: archive[k] for k in archive.files}


def brecq_keys_shapes(ref: dict) -> list[tuple[str, tuple[int, ...]]]:
  """The recorded BRECQ state-dict (key, shape) pairs, in state-dict order."""
  return [(str(k), tuple(int(d) for d in s if d >= 0)) for k, s in zip(ref['keys'], ref['shapes'])]


def abstract_variables(model: nn.Module, size: int = 32) -> dict:
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)


# ------------------------------------------------------------------ against BRECQ

@pytest.mark.parametrize('name', ZOO)
def test_key_layout_is_brecqs(name):
  """Our 'brecq' layout has exactly the keys and shapes of BRECQ's state dict (without
  num_batches_tracked); 'torchvision' keys fit only where BRECQ's names have no '_'."""
  brecq = {k: s for k, s in brecq_keys_shapes(reference(name))
           if not k.endswith('num_batches_tracked')}
  ours = {k: shape for k, (_, shape) in expected_layout(get_model(name), name, 'brecq').items()}
  assert ours == brecq
  plain = set(expected_layout(get_model(name), name, 'torchvision'))
  if name == 'mnasnet':
    assert plain == set(brecq)
  else:
    assert plain ^ set(brecq) and all('_bn.' in k for k in set(brecq) - plain)


@pytest.mark.slow(seconds=4)
@pytest.mark.parametrize('name', ZOO)
def test_logits_equal_brecqs_pytorch_model(name):
  """The recorded weights, regenerated and converted with scheme 'brecq', give BRECQ's
  eval-mode logits on the recorded 224x224 images: max |ours - BRECQ| <= 1e-5 of the
  largest |logit| (float32)."""
  ref = reference(name)
  assert str(ref['branch_end']) == zoo_weights.BRANCH_END_BN[name]
  seed = int(ref['seed'])
  state_dict = zoo_weights.state_dict_for(brecq_keys_shapes(ref), seed, str(ref['branch_end']))
  variables = convert_state_dict(state_dict, name, scheme='brecq')
  model = get_model(name)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, zoo_weights.images(seed)))
  expected = ref['logits']
  chex.assert_shape(logits, (2, 1000))
  chex.assert_type(logits, jnp.float32)
  scale = np.abs(expected).max()
  tolerance = RTOL_OF_SCALE * scale
  assert np.std(expected) > 0.1 * scale                               # classes apart
  assert np.abs(expected[0] - expected[1]).max() > 1000 * tolerance  # images apart
  np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize('name', ZOO)
def test_brecq_scheme_round_trips(name):
  """to_state_dict(..., 'brecq') writes BRECQ's keys, which convert back to the same tree."""
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32),
                           abstract_variables(get_model(name), 224))
  state_dict = to_state_dict(variables, name, scheme='brecq')
  expected = {k for k in reference(name)['keys'] if not k.endswith('num_batches_tracked')}
  assert set(state_dict) == expected
  chex.assert_trees_all_equal(convert_state_dict(state_dict, name, scheme='brecq'), variables)


def test_regnet_brecq_checkpoint_needs_the_brecq_scheme():
  ref = reference('regnetx_600m')
  state_dict = zoo_weights.state_dict_for(brecq_keys_shapes(ref), int(ref['seed']))
  with pytest.raises(CheckpointError, match=re.escape('unexpected s1.b1.f.a_bn.weight')):
    convert_state_dict(state_dict, 'regnetx_600m')


# ------------------------------------------------------------------ stage tables

@pytest.mark.parametrize('stages, expected', [
    (REGNETX_600M_STAGES, ((1, 48, 24), (3, 96, 24), (5, 240, 24), (7, 528, 24))),
    (REGNETX_3200M_STAGES, ((2, 96, 48), (6, 192, 48), (15, 432, 48), (2, 1008, 48))),
    # pycls's RegNetX-200MF (WA 36.44, W0 24, WM 2.49, depth 13, group width 8)
    (regnetx_stages(36.44, 24, 2.49, 13, 8), ((1, 24, 8), (1, 56, 8), (4, 152, 8), (7, 368, 8))),
])
def test_regnetx_stages(stages, expected):
  assert stages == expected


@pytest.mark.parametrize('scale, expected', [
    (1.0, (32, 16, 24, 40, 80, 96, 192, 320)),
    (2.0, (64, 32, 48, 80, 160, 192, 384, 640)),
    (0.5, (16, 8, 16, 24, 40, 48, 96, 160)),
])
def test_mnasnet_depths(scale, expected):
  assert mnasnet_depths(scale) == expected


@pytest.mark.parametrize('name, millions', [
    ('regnetx_600m', 6.20), ('regnetx_3200m', 15.30), ('mnasnet', 12.47)])
def test_parameter_counts(name, millions):
  params = abstract_variables(get_model(name))['params']
  assert round(sum(p.size for p in jax.tree.leaves(params)) / 1e6, 2) == millions


# ------------------------------------------------------------------ tiny variants

TINY_REGNET = RegNetX(((1, 16, 8), (2, 24, 8)), num_classes=5, stem_planes=8)
TINY_MNASNET = MnasNet(num_classes=5, depths=(8, 8, 16, 24), stacks=((3, 3, 1, 2), (5, 6, 2, 1)),
                       last_planes=32)


def blocks_of(model: nn.Module, image_size: int = 32) -> dict[str, nn.Module]:
  """Block name -> XBlock / MnasInvertedResidual module, recorded while tracing."""
  blocks = {}

  def record(next_fn, args, kwargs, context):
    if isinstance(context.module, (XBlock, MnasInvertedResidual)):
      blocks[context.module.name] = context.module
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_variables(model, image_size)
  return blocks


def test_tiny_regnet_structure():
  variables = abstract_variables(TINY_REGNET)
  assert set(variables['params']) == {'stem_conv', 'stem_bn', 's1_b1', 's2_b1', 's2_b2',
                                      'head_fc'}
  chex.assert_shape(variables['params']['s2_b1']['f_b']['kernel'], (3, 3, 8, 24))  # 3 groups
  chex.assert_shape(variables['params']['s2_b1']['proj']['kernel'], (1, 1, 16, 24))
  assert set(variables['params']['s2_b2']) == {'f_a', 'f_a_bn', 'f_b', 'f_b_bn', 'f_c', 'f_c_bn'}
  blocks = blocks_of(TINY_REGNET)
  assert {n: (b.stride, b.groups, b.has_proj) for n, b in blocks.items()} == {
      's1_b1': (2, 2, True), 's2_b1': (2, 3, True), 's2_b2': (1, 3, False)}
  logits = jax.eval_shape(lambda v, x: TINY_REGNET.apply(v, x, train=False), variables,
                          jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  chex.assert_shape(logits, (2, 5))


def test_tiny_mnasnet_structure():
  variables = abstract_variables(TINY_MNASNET)
  assert set(variables['params']) == {'layers_0', 'layers_1', 'layers_3', 'layers_4', 'layers_6',
                                      'layers_7', 'layers_8_0', 'layers_9_0', 'layers_9_1',
                                      'layers_10', 'layers_11', 'classifier_1'}
  chex.assert_shape(variables['params']['layers_3']['kernel'], (3, 3, 1, 8))
  chex.assert_shape(variables['params']['layers_9_1']['layers_3']['kernel'], (5, 5, 1, 144))
  chex.assert_shape(variables['params']['layers_10']['kernel'], (1, 1, 24, 32))
  blocks = blocks_of(TINY_MNASNET)
  assert {n: (b.kernel, b.stride, b.hidden_planes, b.use_residual) for n, b in blocks.items()} == {
      'layers_8_0': (3, 2, 24, False), 'layers_9_0': (5, 1, 96, False),
      'layers_9_1': (5, 1, 144, True)}


def random_variables(module: nn.Module, x: jax.Array, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def silence(variables: dict, bn: str) -> dict:
  """``variables`` with the BN called ``bn`` outputting zeros (scale 0, bias 0)."""
  params = dict(variables['params'])
  params[bn] = {'scale': np.zeros_like(params[bn]['scale']),
                'bias': np.zeros_like(params[bn]['bias'])}
  return {**variables, 'params': params}


@pytest.mark.parametrize('block, residual_bn, expected', [
    (XBlock(16, 16, 1, 8), 'f_c_bn', lambda x: jax.nn.relu(x)),   # ReLU after the sum
    (MnasInvertedResidual(16, 16, 3, 1, 3), 'layers_7', lambda x: x),   # no ReLU after it
    (MnasInvertedResidual(16, 24, 5, 1, 6), 'layers_7', lambda x: jnp.zeros((2, 8, 8, 24))),
])
def test_shortcuts(block, residual_bn, expected):
  """With the residual branch's last BN silenced a block outputs its shortcut alone:
  ReLU(x) for RegNet's identity X block, x for a MnasNet residual, 0 without residual."""
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 16))
  variables = silence(random_variables(block, x), residual_bn)
  np.testing.assert_allclose(block.apply(variables, x, train=False), expected(x), atol=1e-6)


def test_regnet_projection_shortcut():
  """A strided X block's shortcut is BN(1x1 strided conv): silencing the branch leaves it."""
  block = XBlock(8, 16, 2, 8)
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 8))
  variables = silence(random_variables(block, x), 'f_c_bn')
  p, s = variables['params'], variables['batch_stats']
  proj = jnp.einsum('nhwc,cd->nhwd', x[:, ::2, ::2], p['proj']['kernel'][0, 0])
  bn = (proj - s['bn']['mean']) / jnp.sqrt(s['bn']['var'] + 1e-5)
  bn = bn * p['bn']['scale'] + p['bn']['bias']
  np.testing.assert_allclose(block.apply(variables, x, train=False), jax.nn.relu(bn),
                             rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ quantized end to end

@pytest.mark.slow(seconds=12)
@pytest.mark.parametrize('model, kinds', [
    (TINY_REGNET, ['conv', 'bottleneck', 'bottleneck', 'bottleneck', 'head']),
    (TINY_MNASNET, ['conv', 'conv', 'linear_conv', 'inverted', 'inverted', 'inverted', 'conv',
                    'head']),
], ids=['regnetx', 'mnasnet'])
def test_tiny_variants_quantize_and_run_on_integers(model, kinds):
  """Read by the adapter like any model (RegNet's grouped bottlenecks with projection
  shortcuts, MnasNet's separable stem, 5x5 depthwise inverted residuals) and quantized
  to powers of two without reconstruction (the wiring is what is new here; every phase
  runs on a new kind in tests/test_units.py): integer-only inference equals the
  simulation."""
  images = jax.random.normal(jax.random.key(0), (32, 16, 16, 3), jnp.float32)
  variables = nets.random_variables(model, 16)
  net = adapter.read_model(model, variables, images, apply_kwargs={'train': False})
  assert [u.kind for u in net.units] == kinds
  assert {u.activation for u in net.units if u.kind not in ('head', 'linear_conv')} == {'relu'}
  nets.quantize_to_integers(net, images, reconstruct=False, search="none")
