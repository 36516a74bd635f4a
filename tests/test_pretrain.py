"""Fashion-MNIST models and experiments.pretrain: folding, to_state_dict, training, committed checkpoints."""
import hashlib
import importlib
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from experiments import data
from experiments import pipeline
from experiments import pretrain
from rapq_jax import adapter, convert, evaluate
from rapq_jax.models import get_model, input_shape
from rapq_jax.network import network_apply

FMNIST_MODELS = ('fmnist_resnet', 'fmnist_mobilenet')
MIN_TOP1 = {'fmnist_resnet': 90.0, 'fmnist_mobilenet': 88.0}


def random_variables(name: str, seed: int = 0) -> dict:
  """Variables of ``name`` with random weights, BN affine parameters and running statistics."""
  model = get_model(name)
  image = jax.ShapeDtypeStruct((1, *input_shape(name)), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images_of(name: str, n: int = 4, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, *input_shape(name))).astype(np.float32)


# Models

@pytest.mark.parametrize('name, params', [('fmnist_resnet', 43490), ('fmnist_mobilenet', 26298)])
def test_fmnist_models_are_small_28x28x1_classifiers(name, params):
  assert input_shape(name) == (28, 28, 1)
  variables = random_variables(name)
  assert sum(p.size for p in jax.tree.leaves(variables['params'])) == params
  logits = get_model(name).apply(variables, images_of(name), train=False)
  chex.assert_shape(logits, (4, 10))


@pytest.mark.parametrize('name, units', [
    ('fmnist_resnet', ['conv1'] + [f'layer{s}_{i}' for s in (1, 2, 3) for i in (0, 1)] + ['linear']),
    ('fmnist_mobilenet', [f'features_{i}' for i in range(8)] + ['classifier_1']),
])
def test_fold_matches_the_model(name, units):
  model, variables = get_model(name), random_variables(name)
  x = images_of(name)
  net = adapter.read_model(model, variables, x, apply_kwargs={'train': False})
  assert [u.name for u in net.units] == units
  np.testing.assert_allclose(network_apply(net, x), model.apply(variables, x, train=False),
                             rtol=1e-4, atol=1e-4)


# to_state_dict

@pytest.mark.parametrize('name', FMNIST_MODELS + ('cifar_resnet20', 'resnet18', 'mobilenetv2'))
def test_to_state_dict_round_trips(name):
  variables = random_variables(name)
  state_dict = convert.to_state_dict(variables, name)
  assert all(v.dtype == np.float32 for v in state_dict.values())
  converted = convert.convert_state_dict(state_dict, name)
  chex.assert_trees_all_equal_structs(converted, variables)
  chex.assert_trees_all_equal(converted, variables)


@pytest.mark.parametrize('key, shape', [
    ('features.0.0.weight', (16, 1, 3, 3)),
    ('features.0.1.running_var', (16,)),
    ('features.1.conv.0.0.weight', (16, 1, 3, 3)),
    ('features.1.conv.1.weight', (8, 16, 1, 1)),
    ('features.2.conv.1.0.weight', (32, 1, 3, 3)),
    ('features.6.conv.3.running_mean', (32,)),
    ('features.7.0.weight', (128, 32, 1, 1)),
    ('classifier.1.weight', (10, 128)),
    ('classifier.1.bias', (10,)),
])
def test_to_state_dict_uses_torch_names_and_layouts(key, shape):
  assert convert.to_state_dict(random_variables('fmnist_mobilenet'), 'fmnist_mobilenet')[key].shape == shape


def test_to_state_dict_transposes_kernels():
  variables = random_variables('fmnist_mobilenet')
  state_dict = convert.to_state_dict(variables, 'fmnist_mobilenet')
  np.testing.assert_array_equal(state_dict['features.0.0.weight'],
                                variables['params']['features_0']['0']['kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state_dict['classifier.1.weight'],
                                variables['params']['classifier_1']['kernel'].T)


def test_to_state_dict_rejects_another_models_variables():
  with pytest.raises(convert.CheckpointError, match='unexpected params/linear/kernel'):
    convert.to_state_dict(random_variables('fmnist_resnet'), 'fmnist_mobilenet')


# experiments.pretrain

def tiny_config(fashion_mnist_dir):
  config = importlib.import_module('experiments.configs.pretrain_fmnist_resnet').get_config()
  config.data_dir = str(fashion_mnist_dir)
  config.train_size, config.batch_size, config.epochs = 512, 64, 2
  config.test_size = 1000
  return config


@pytest.mark.slow(seconds=14)
def test_tiny_training_run_learns_and_writes_a_loadable_checkpoint(tmp_path, fashion_mnist_dir):
  config = tiny_config(fashion_mnist_dir)
  record = pretrain.train_and_evaluate(config, tmp_path / 'a')
  assert sorted(os.listdir(tmp_path / 'a')) == ['fmnist_resnet.json', 'fmnist_resnet.npz']
  assert [e['epoch'] for e in record['log']] == [1, 2]
  assert record['log'][1]['loss'] < record['log'][0]['loss'] < np.log(10) + 0.5
  assert json.loads((tmp_path / 'a' / 'fmnist_resnet.json').read_text()) == record
  assert record['seed'] == 0 and record['config']['train_size'] == 512
  assert record['test_images'] == 1000
  assert record['test_top1'] == record['log'][-1]['test_top1'] > 20.0
  model, variables = convert.load_pretrained(tmp_path / 'a' / 'fmnist_resnet.npz', 'fmnist_resnet')
  assert model == get_model('fmnist_resnet')

  # Same seed, same machine: the same weights.
  pretrain.train_and_evaluate(config, tmp_path / 'b')
  _, again = convert.load_pretrained(tmp_path / 'b' / 'fmnist_resnet.npz', 'fmnist_resnet')
  chex.assert_trees_all_equal(again, variables)


def test_pretrain_config_names_resolve_to_their_files():
  assert configs.available_pretrain() == ['fmnist_mobilenet', 'fmnist_resnet']
  assert not any(name.startswith('pretrain_') for name in configs.available())
  path = configs.pretrain_config_path('fmnist_resnet')
  assert pretrain.resolve_config_argv(['x', '--config', 'fmnist_resnet']) == ['x', '--config', path]
  assert pretrain.resolve_config_argv(['--config=fmnist_resnet']) == [f'--config={path}']
  with pytest.raises(ValueError, match="unknown pretraining config 'nope'; available: fmnist_mob"):
    pretrain.resolve_config_argv(['--config', 'nope'])


# Committed checkpoints, through the quantization configs

def quantization_config(name):
  return importlib.import_module(f'experiments.configs.{name}').get_config()


@pytest.mark.parametrize('name', FMNIST_MODELS)
def test_committed_checkpoint_is_small_and_recorded(name):
  checkpoint = pretrain.CHECKPOINT_DIR / f'{name}.npz'
  record = json.loads((pretrain.CHECKPOINT_DIR / f'{name}.json').read_text())
  assert checkpoint.stat().st_size < 1 << 20
  assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == record['checkpoint_sha256']
  assert record['model'] == name and record['test_top1'] >= MIN_TOP1[name]
  assert record['test_top1'] == record['log'][-1]['test_top1']


@pytest.mark.slow
@pytest.mark.parametrize('name', FMNIST_MODELS)
def test_committed_checkpoint_reaches_its_recorded_accuracy(name, tmp_path, monkeypatch):
  """On the shipped test split (Fashion-MNIST's whole test set, as the checkpoint's record)."""
  record = json.loads((pretrain.CHECKPOINT_DIR / f'{name}.json').read_text())
  config = quantization_config(name)
  monkeypatch.chdir(tmp_path)  # the repo-relative checkpoint path must not depend on the cwd
  model, variables = pipeline.load_model(config)
  assert model == get_model(name)
  test_data = pipeline.load_data(config)
  result = evaluate.scores(pipeline.model_logits(model, variables, test_data, config, desc=name),
                           test_data.test_labels)
  assert result['n'] == 10000
  assert abs(result['top1'] - record['test_top1']) <= 0.05

  # The trained network folds into units that compute the same logits.
  x = test_data.preprocess(test_data.test_images[:64])
  net = adapter.read_model(model, variables, x, apply_kwargs={'train': False})
  np.testing.assert_allclose(network_apply(net, x), model.apply(variables, x, train=False),
                             rtol=1e-4, atol=1e-4)
