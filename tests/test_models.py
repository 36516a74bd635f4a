"""Model zoo: names, output shapes, the Flax naming contract and block structure."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rapq_jax.models import (MODEL_NAMES, BasicBlock, Bottleneck, CifarBasicBlock,
                             InvertedResidual, MnasInvertedResidual, XBlock, get_model)

IMAGE = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


def abstract_variables(model: nn.Module) -> dict:
  """Variable shapes of ``model`` for one 32x32 image, without computing anything."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), IMAGE)


def block_configs(model: nn.Module) -> dict[str, nn.Module]:
  """Block name -> block module, recorded while tracing a forward pass."""
  blocks = {}

  def record(next_fn, args, kwargs, context):
    if isinstance(context.module, (CifarBasicBlock, BasicBlock, InvertedResidual, XBlock,
                                   MnasInvertedResidual)):
      blocks[context.module.name] = context.module
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_variables(model)
  return blocks


def test_model_names():
  assert MODEL_NAMES == ('cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44', 'cifar_resnet56',
                         'resnet18', 'resnet50', 'mobilenetv2', 'fmnist_resnet', 'fmnist_mobilenet',
                         'regnetx_600m', 'regnetx_3200m', 'mnasnet')


def test_unknown_name_lists_accepted_names():
  with pytest.raises(ValueError, match='resnet99') as error:
    get_model('resnet99')
  for name in MODEL_NAMES:
    assert name in str(error.value)


@pytest.mark.parametrize('name, num_classes, expected', [
    ('cifar_resnet20', None, 10),
    ('cifar_resnet56', None, 10),
    ('resnet18', None, 1000),
    ('resnet50', None, 1000),
    ('mobilenetv2', None, 1000),
    ('regnetx_600m', None, 1000),
    ('regnetx_3200m', None, 1000),
    ('mnasnet', None, 1000),
    ('cifar_resnet32', 100, 100),
    ('resnet18', 7, 7),
])
def test_logits_shape(name, num_classes, expected):
  model = get_model(name, num_classes)
  logits = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), abstract_variables(model), IMAGE)
  chex.assert_shape(logits, (1, expected))
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name, top_level', [
    ('cifar_resnet20', {'conv1', 'bn1', 'linear'} | {f'layer{s}_{i}' for s in (1, 2, 3)
                                                    for i in range(3)}),
    ('resnet18', {'conv1', 'bn1', 'fc'} | {f'layer{s}_{i}' for s in (1, 2, 3, 4) for i in (0, 1)}),
    ('resnet50', {'conv1', 'bn1', 'fc'} | {f'layer{s}_{i}' for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3))
                                           for i in range(n)}),
    ('mobilenetv2', {f'features_{i}' for i in range(19)} | {'classifier_1'}),
    ('regnetx_600m', {'stem_conv', 'stem_bn', 'head_fc'} | {
        f's{s}_b{b}' for s, n in zip((1, 2, 3, 4), (1, 3, 5, 7)) for b in range(1, n + 1)}),
    ('mnasnet', {f'layers_{i}' for i in (0, 1, 3, 4, 6, 7, 14, 15)} | {'classifier_1'} | {
        f'layers_{s}_{i}' for s, n in zip(range(8, 14), (3, 3, 3, 2, 4, 1)) for i in range(n)}),
])
def test_top_level_names(name, top_level):
  assert set(abstract_variables(get_model(name))['params']) == top_level


@pytest.mark.parametrize('name, path, shape', [
    ('cifar_resnet20', 'params/conv1/kernel', (3, 3, 3, 16)),
    ('cifar_resnet20', 'params/layer2_0/conv1/kernel', (3, 3, 16, 32)),
    ('cifar_resnet20', 'params/layer3_2/bn2/scale', (64,)),
    ('cifar_resnet20', 'batch_stats/layer3_2/bn2/var', (64,)),
    ('cifar_resnet20', 'params/linear/kernel', (64, 10)),
    ('resnet18', 'params/conv1/kernel', (7, 7, 3, 64)),
    ('resnet18', 'params/layer1_0/conv1/kernel', (3, 3, 64, 64)),
    ('resnet18', 'params/layer2_0/downsample_0/kernel', (1, 1, 64, 128)),
    ('resnet18', 'params/layer2_0/downsample_1/bias', (128,)),
    ('resnet18', 'batch_stats/layer4_1/bn2/mean', (512,)),
    ('resnet18', 'params/fc/kernel', (512, 1000)),
    ('resnet18', 'params/fc/bias', (1000,)),
    ('resnet50', 'params/layer1_0/downsample_0/kernel', (1, 1, 64, 256)),
    ('resnet50', 'params/layer2_0/conv2/kernel', (3, 3, 128, 128)),
    ('resnet50', 'params/layer4_2/conv3/kernel', (1, 1, 512, 2048)),
    ('resnet50', 'batch_stats/layer4_2/bn3/var', (2048,)),
    ('resnet50', 'params/fc/kernel', (2048, 1000)),
    ('mobilenetv2', 'params/features_0/0/kernel', (3, 3, 3, 32)),
    ('mobilenetv2', 'batch_stats/features_0/1/mean', (32,)),
    ('mobilenetv2', 'params/features_1/conv_0_0/kernel', (3, 3, 1, 32)),
    ('mobilenetv2', 'params/features_1/conv_0_1/scale', (32,)),
    ('mobilenetv2', 'params/features_1/conv_1/kernel', (1, 1, 32, 16)),
    ('mobilenetv2', 'batch_stats/features_1/conv_2/var', (16,)),
    ('mobilenetv2', 'params/features_2/conv_0_0/kernel', (1, 1, 16, 96)),
    ('mobilenetv2', 'params/features_2/conv_0_1/bias', (96,)),
    ('mobilenetv2', 'params/features_2/conv_1_0/kernel', (3, 3, 1, 96)),
    ('mobilenetv2', 'params/features_2/conv_1_1/scale', (96,)),
    ('mobilenetv2', 'params/features_2/conv_2/kernel', (1, 1, 96, 24)),
    ('mobilenetv2', 'batch_stats/features_17/conv_3/var', (320,)),
    ('mobilenetv2', 'params/features_18/0/kernel', (1, 1, 320, 1280)),
    ('mobilenetv2', 'params/features_18/1/scale', (1280,)),
    ('mobilenetv2', 'params/classifier_1/kernel', (1280, 1000)),
    ('regnetx_600m', 'params/stem_conv/kernel', (3, 3, 3, 32)),
    ('regnetx_600m', 'batch_stats/stem_bn/var', (32,)),
    ('regnetx_600m', 'params/s1_b1/f_a/kernel', (1, 1, 32, 48)),
    ('regnetx_600m', 'params/s1_b1/f_b/kernel', (3, 3, 24, 48)),
    ('regnetx_600m', 'params/s1_b1/proj/kernel', (1, 1, 32, 48)),
    ('regnetx_600m', 'batch_stats/s1_b1/bn/mean', (48,)),
    ('regnetx_600m', 'params/s4_b7/f_c/kernel', (1, 1, 528, 528)),
    ('regnetx_600m', 'params/s4_b7/f_c_bn/scale', (528,)),
    ('regnetx_600m', 'params/head_fc/kernel', (528, 1000)),
    ('regnetx_3200m', 'params/s3_b15/f_b/kernel', (3, 3, 48, 432)),
    ('regnetx_3200m', 'params/head_fc/kernel', (1008, 1000)),
    ('mnasnet', 'params/layers_0/kernel', (3, 3, 3, 64)),
    ('mnasnet', 'params/layers_3/kernel', (3, 3, 1, 64)),
    ('mnasnet', 'params/layers_6/kernel', (1, 1, 64, 32)),
    ('mnasnet', 'params/layers_8_0/layers_0/kernel', (1, 1, 32, 96)),
    ('mnasnet', 'params/layers_9_1/layers_3/kernel', (5, 5, 1, 240)),
    ('mnasnet', 'batch_stats/layers_13_0/layers_7/var', (640,)),
    ('mnasnet', 'params/layers_14/kernel', (1, 1, 640, 1280)),
    ('mnasnet', 'params/classifier_1/kernel', (1280, 1000)),
])
def test_variable_paths_mirror_torch_names(name, path, shape):
  node = abstract_variables(get_model(name))
  for key in path.split('/'):
    node = node[key]
  chex.assert_shape(node, shape)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_convs_have_no_bias(name):
  layers = jax.tree_util.tree_flatten_with_path(
      abstract_variables(get_model(name))['params'], is_leaf=lambda n: isinstance(n, dict) and 'kernel' in n)[0]
  convs = [layer for _, layer in layers if isinstance(layer, dict) and layer['kernel'].ndim == 4]
  assert convs and all(set(layer) == {'kernel'} for layer in convs)


@pytest.mark.parametrize('name, block, config', [
    ('cifar_resnet20', 'layer1_0', dict(in_planes=16, planes=16, stride=1)),
    ('cifar_resnet20', 'layer2_0', dict(in_planes=16, planes=32, stride=2)),
    ('cifar_resnet56', 'layer3_8', dict(in_planes=64, planes=64, stride=1)),
    ('resnet18', 'layer1_0', dict(in_planes=64, planes=64, stride=1, has_downsample=False)),
    ('resnet18', 'layer2_0', dict(in_planes=64, planes=128, stride=2, has_downsample=True)),
    ('resnet50', 'layer1_0', dict(in_planes=64, planes=64, stride=1, has_downsample=True,
                                  expansion=4)),
    ('resnet50', 'layer3_1', dict(in_planes=1024, planes=256, stride=1, has_downsample=False)),
    ('mobilenetv2', 'features_1', dict(in_planes=32, out_planes=16, stride=1, expand_ratio=1,
                                       hidden_planes=32, use_residual=False)),
    ('mobilenetv2', 'features_3', dict(in_planes=24, out_planes=24, stride=1, expand_ratio=6,
                                       hidden_planes=144, use_residual=True)),
    ('mobilenetv2', 'features_14', dict(in_planes=96, out_planes=160, stride=2, expand_ratio=6,
                                        hidden_planes=576, use_residual=False)),
    ('regnetx_600m', 's1_b1', dict(in_planes=32, planes=48, stride=2, groups=2, has_proj=True)),
    ('regnetx_600m', 's3_b2', dict(in_planes=240, planes=240, stride=1, groups=10,
                                   has_proj=False)),
    ('regnetx_3200m', 's4_b1', dict(in_planes=432, planes=1008, stride=2, groups=21,
                                    has_proj=True)),
    ('mnasnet', 'layers_8_0', dict(in_planes=32, out_planes=48, kernel=3, stride=2,
                                   hidden_planes=96, use_residual=False)),
    ('mnasnet', 'layers_11_0', dict(in_planes=160, out_planes=192, kernel=3, stride=1,
                                    hidden_planes=960, use_residual=False)),
    ('mnasnet', 'layers_12_3', dict(in_planes=384, out_planes=384, kernel=5, stride=1,
                                    hidden_planes=2304, use_residual=True)),
])
def test_blocks_expose_their_config(name, block, config):
  module = block_configs(get_model(name))[block]
  assert {k: getattr(module, k) for k in config} == config


@pytest.mark.parametrize('name, count, cls', [
    ('cifar_resnet20', 9, CifarBasicBlock),
    ('cifar_resnet56', 27, CifarBasicBlock),
    ('resnet18', 8, BasicBlock),
    ('resnet50', 16, Bottleneck),
    ('mobilenetv2', 17, InvertedResidual),
    ('regnetx_600m', 16, XBlock),
    ('regnetx_3200m', 25, XBlock),
    ('mnasnet', 16, MnasInvertedResidual),
])
def test_block_count(name, count, cls):
  blocks = block_configs(get_model(name))
  assert len(blocks) == count and all(type(b) is cls for b in blocks.values())


def test_train_mode_updates_batch_stats_like_torch():
  """Running stats move 10 % of the way to the batch statistics (torch momentum 0.1)."""
  model = get_model('cifar_resnet20')
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
                           abstract_variables(model))
  _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  conv1 = jax.lax.conv_general_dilated(
      x, variables['params']['conv1']['kernel'], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = 0.9 * variables['batch_stats']['bn1']['mean'] + 0.1 * conv1.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updated['batch_stats']['bn1']['mean'], expected, rtol=1e-5)
