"""PyTorch state dict -> Flax variables: layouts, key schemes, errors, file loading, real
weights, and the converted ResNet-18 / MobileNetV2 forwards against PyTorch ones."""
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch   # pinned in requirements.txt: a missing one fails, never skips

from rapq_jax.convert import (CheckpointError, convert_state_dict, load_pretrained,
                              load_state_dict)
from rapq_jax.models import CifarResNet, get_model

BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
MNV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
# torchvision -> BRECQ release key of a MobileNetV2 block layer (first block, other blocks).
BRECQ_FIRST_BLOCK = {'conv.0.0': 'conv.0', 'conv.0.1': 'conv.1', 'conv.1': 'conv.3',
                     'conv.2': 'conv.4'}
BRECQ_BLOCK = {'conv.0.0': 'conv.0', 'conv.0.1': 'conv.1', 'conv.1.0': 'conv.3',
               'conv.1.1': 'conv.4', 'conv.2': 'conv.6', 'conv.3': 'conv.7'}
CIFAR_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
CIFAR_STD = np.array((0.229, 0.224, 0.225), np.float32)


def conv(key: str, out: int, inp: int, k: int) -> dict[str, tuple[int, ...]]:
  return {f'{key}.weight': (out, inp, k, k)}


def bn(key: str, c: int) -> dict[str, tuple[int, ...]]:
  return {f'{key}.{p}': () if p == 'num_batches_tracked' else (c,) for p in BN_KEYS}


def linear(key: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
  return {f'{key}.weight': (out, inp), f'{key}.bias': (out,)}


def torch_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """State-dict key -> shape of the PyTorch original (torchvision / akamaster), built independently."""
  if name.startswith('cifar_resnet'):
    n = (int(name.removeprefix('cifar_resnet')) - 2) // 6
    shapes, inp = conv('conv1', 16, 3, 3) | bn('bn1', 16), 16
    for s, planes in enumerate((16, 32, 64)):
      for i in range(n):
        key = f'layer{s + 1}.{i}'
        shapes |= conv(f'{key}.conv1', planes, inp, 3) | bn(f'{key}.bn1', planes)
        shapes |= conv(f'{key}.conv2', planes, planes, 3) | bn(f'{key}.bn2', planes)
        inp = planes
    return shapes | linear('linear', 10, 64)
  if name in ('resnet18', 'resnet50'):
    bottleneck = name == 'resnet50'
    expansion, blocks = (4, (3, 4, 6, 3)) if bottleneck else (1, (2, 2, 2, 2))
    shapes, inp = conv('conv1', 64, 3, 7) | bn('bn1', 64), 64
    for s, n in enumerate(blocks):
      planes = 64 * 2**s
      for i in range(n):
        key = f'layer{s + 1}.{i}'
        if bottleneck:
          widths = ((planes, inp, 1), (planes, planes, 3), (4 * planes, planes, 1))
        else:
          widths = ((planes, inp, 3), (planes, planes, 3))
        for j, (out, cin, k) in enumerate(widths, 1):
          shapes |= conv(f'{key}.conv{j}', out, cin, k) | bn(f'{key}.bn{j}', out)
        if (s > 0 and i == 0) or inp != planes * expansion:
          shapes |= conv(f'{key}.downsample.0', planes * expansion, inp, 1)
          shapes |= bn(f'{key}.downsample.1', planes * expansion)
        inp = planes * expansion
    return shapes | linear('fc', 1000, inp)
  assert name == 'mobilenetv2'
  shapes, inp, index = conv('features.0.0', 32, 3, 3) | bn('features.0.1', 32), 32, 1
  for t, c, n, _ in MNV2_SETTING:
    for _ in range(n):
      key, hidden = f'features.{index}.conv', inp * t
      layer = 0
      if t != 1:
        shapes |= conv(f'{key}.0.0', hidden, inp, 1) | bn(f'{key}.0.1', hidden)
        layer = 1
      shapes |= {f'{key}.{layer}.0.weight': (hidden, 1, 3, 3)} | bn(f'{key}.{layer}.1', hidden)
      shapes |= conv(f'{key}.{layer + 1}', c, hidden, 1) | bn(f'{key}.{layer + 2}', c)
      inp, index = c, index + 1
  shapes |= conv('features.18.0', 1280, 320, 1) | bn('features.18.1', 1280)
  return shapes | linear('classifier.1', 1000, 1280)


def random_state_dict(name: str, seed: int = 0) -> dict[str, np.ndarray]:
  """PyTorch-keyed random weights; BN variances positive, counters int64 as in torch."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in torch_shapes(name).items():
    if key.endswith('num_batches_tracked'):
      state_dict[key] = np.array(7, np.int64)
    elif key.endswith('running_var'):
      state_dict[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state_dict[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return state_dict


def brecq_key(key: str) -> str:
  """torchvision MobileNetV2 key -> BRECQ release key."""
  parts = key.split('.')
  if parts[0] != 'features' or parts[2] != 'conv':
    return key
  table = BRECQ_FIRST_BLOCK if parts[1] == '1' else BRECQ_BLOCK
  return '.'.join(['features', parts[1], table['.'.join(parts[2:-1])], parts[-1]])


def assert_trees_equal(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize('name, millions', [
    ('cifar_resnet20', 0.27),
    ('cifar_resnet56', 0.85),
    ('resnet18', 11.69),
    ('resnet50', 25.56),
    ('mobilenetv2', 3.50),
])
def test_torch_weights_convert_and_run(name, millions):
  model = get_model(name)
  variables = convert_state_dict(random_state_dict(name), name)
  assert round(sum(p.size for p in jax.tree.leaves(variables['params'])) / 1e6, 2) == millions
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))
  image = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype(np.float32)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, image)
  chex.assert_shape(logits, (1, 1000 if not name.startswith('cifar') else 10))
  chex.assert_tree_all_finite(logits)


# ------------------------------------------------------------------ forward vs PyTorch
# PyTorch reference modules written out after torchvision's ResNet-18 and MobileNetV2
# (torchvision.models.resnet / mobilenetv2, width 1.0): same modules, module names and
# so state-dict keys, same forward. torchvision itself is not a dependency: PyPI's
# torchvision 0.28.0 does not import beside the pinned torch 2.13.0 CPU build
# ("operator torchvision::nms does not exist").

def torch_conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=None):
  """torchvision's Conv2dNormActivation: conv (no bias, padding (k - 1) // 2), BN[, act]."""
  layers = [torch.nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            torch.nn.BatchNorm2d(cout)]
  return torch.nn.Sequential(*layers, *([act()] if act else []))


class TorchBasicBlock(torch.nn.Module):
  """torchvision ResNet BasicBlock: 3x3 (stride) conv-BN-ReLU, 3x3 conv-BN, + identity
  or ``downsample`` (1x1 strided conv, BN), ReLU."""

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, planes, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(torch.nn.Module):
  """torchvision resnet18: 7x7/2 conv-BN-ReLU, 3x3/2 max pool (padding 1), 4 stages of
  2 BasicBlocks (64..512, stride 2 from stage 2), global average pool, fc."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(64)
    self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    cin = 64
    for stage in range(4):
      planes = 64 * 2**stage
      setattr(self, f'layer{stage + 1}', torch.nn.Sequential(
          TorchBasicBlock(cin, planes, 2 if stage else 1), TorchBasicBlock(planes, planes, 1)))
      cin = planes
    self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
    self.fc = torch.nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchInvertedResidual(torch.nn.Module):
  """torchvision MobileNetV2 block: ``conv`` = [1x1 expand conv-BN-ReLU6 unless t = 1,]
  3x3 depthwise (stride) conv-BN-ReLU6, 1x1 conv, BN; + x when stride 1 and cin == cout."""

  def __init__(self, cin: int, cout: int, stride: int, t: int):
    super().__init__()
    hidden = int(round(cin * t))
    self.use_res_connect = stride == 1 and cin == cout
    layers = [torch_conv_bn(cin, hidden, 1, act=torch.nn.ReLU6)] if t != 1 else []
    layers += [torch_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=torch.nn.ReLU6),
               torch.nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), torch.nn.BatchNorm2d(cout)]
    self.conv = torch.nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchMobileNetV2(torch.nn.Module):
  """torchvision mobilenet_v2 (width 1.0): 3x3/2 conv-BN-ReLU6 (32), the inverted
  residual stages of MNV2_SETTING, 1x1 conv-BN-ReLU6 (1280), global average pool,
  classifier = [Dropout(0.2), Linear]."""

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    features, cin = [torch_conv_bn(3, 32, 3, 2, act=torch.nn.ReLU6)], 32
    for t, c, n, s in MNV2_SETTING:
      for i in range(n):
        features.append(TorchInvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    features.append(torch_conv_bn(cin, 1280, 1, act=torch.nn.ReLU6))
    self.features = torch.nn.Sequential(*features)
    self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(1280, num_classes))

  def forward(self, x):
    x = torch.nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
    return self.classifier(torch.flatten(x, 1))


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """``module`` in eval mode with random weights: He-normal convs, random BN affine
  parameters and running statistics (so folding them matters), random fc."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.2, generator=g)
        m.running_mean.normal_(0.0, 0.2, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
      elif isinstance(m, torch.nn.Linear):
        m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
        m.bias.normal_(0.0, 0.2, generator=g)
  return module.eval()


@pytest.mark.parametrize('name, reference', [('resnet18', TorchResNet18),
                                             ('mobilenetv2', TorchMobileNetV2)])
def test_flax_forward_equals_pytorch_forward(name, reference):
  """The same random weights, converted by ``convert_state_dict`` from the PyTorch
  module's own state dict, give the PyTorch module's logits (eval mode) on two 64x64
  images: float32 agreement within 1e-4 of the logit scale. The networks are fully
  convolutional up to the global pool, so small images exercise every layer."""
  module = randomized(reference())
  state_dict = {k: v.numpy() for k, v in module.state_dict().items()}
  assert set(state_dict) == set(torch_shapes(name))       # the torchvision key layout
  images = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  model = get_model(name)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))   # one compile: faster than eager
  logits = np.asarray(forward(convert_state_dict(state_dict, name), images))
  chex.assert_shape(logits, (2, 1000))
  scale = np.abs(expected).max()
  assert np.std(expected) > 0.1 * scale > 0                # logits that tell classes apart
  assert np.abs(expected[0] - expected[1]).max() > 0.1 * scale   # and images apart
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * scale)


LAYOUTS = {
    'OIHW->HWIO': lambda w: w.transpose(2, 3, 1, 0),
    '[out,in]->[in,out]': lambda w: w.T,
    'as-is': lambda a: a,
}


@pytest.mark.parametrize('torch_key, path, layout', [
    ('features.0.0.weight', 'params/features_0/0/kernel', 'OIHW->HWIO'),
    ('features.2.conv.1.0.weight', 'params/features_2/conv_1_0/kernel', 'OIHW->HWIO'),
    ('classifier.1.weight', 'params/classifier_1/kernel', '[out,in]->[in,out]'),
    ('classifier.1.bias', 'params/classifier_1/bias', 'as-is'),
    ('features.18.1.weight', 'params/features_18/1/scale', 'as-is'),
    ('features.18.1.bias', 'params/features_18/1/bias', 'as-is'),
    ('features.17.conv.3.running_mean', 'batch_stats/features_17/conv_3/mean', 'as-is'),
    ('features.17.conv.3.running_var', 'batch_stats/features_17/conv_3/var', 'as-is'),
])
def test_layouts(torch_key, path, layout):
  """Conv OIHW -> HWIO (depthwise [C, 1, 3, 3] -> [3, 3, 1, C]), linear transposed, BN renamed."""
  state_dict = random_state_dict('mobilenetv2')
  node = convert_state_dict(state_dict, 'mobilenetv2')
  for key in path.split('/'):
    node = node[key]
  np.testing.assert_array_equal(node, LAYOUTS[layout](state_dict[torch_key]))


@pytest.mark.parametrize('wrap', [
    lambda sd: {f'module.{k}': v for k, v in sd.items()},
    lambda sd: {'model': sd},
    lambda sd: {'state_dict': {f'module.{k}': v for k, v in sd.items()}, 'best_prec1': 91.7},
    lambda sd: {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')},
], ids=['module-prefix', 'model-wrapper', 'state_dict-wrapper', 'no-num_batches_tracked'])
def test_wrappers_and_prefixes(wrap):
  state_dict = random_state_dict('cifar_resnet20')
  expected = convert_state_dict(state_dict, 'cifar_resnet20')
  assert_trees_equal(convert_state_dict(wrap(state_dict), 'cifar_resnet20'), expected)


def test_brecq_mobilenetv2_maps_to_the_torchvision_tree():
  state_dict = random_state_dict('mobilenetv2')
  brecq = {brecq_key(k): v for k, v in state_dict.items()}
  assert 'features.1.conv.3.weight' in brecq and 'features.2.conv.7.running_var' in brecq
  assert_trees_equal(convert_state_dict(brecq, 'mobilenetv2', scheme='brecq'),
                     convert_state_dict(state_dict, 'mobilenetv2'))


def test_brecq_resnet_keys_are_torchvision_keys():
  state_dict = random_state_dict('resnet18')
  assert_trees_equal(convert_state_dict(state_dict, 'resnet18', scheme='brecq'),
                     convert_state_dict(state_dict, 'resnet18'))


def test_brecq_keys_do_not_fit_the_torchvision_scheme():
  brecq = {brecq_key(k): v for k, v in random_state_dict('mobilenetv2').items()}
  with pytest.raises(CheckpointError, match='features.2.conv.7.running_var'):
    convert_state_dict(brecq, 'mobilenetv2')


def test_unknown_scheme_and_model():
  with pytest.raises(ValueError, match="'keras'.*torchvision, brecq"):
    convert_state_dict({}, 'resnet18', scheme='keras')
  with pytest.raises(ValueError, match="'vgg16'"):
    convert_state_dict({}, 'vgg16')


def drop(*keys):
  return lambda sd: {k: v for k, v in sd.items() if k not in keys}


def add(*keys):
  return lambda sd: sd | {k: np.zeros(3, np.float32) for k in keys}


def reshape(**shapes):
  return lambda sd: sd | {k.replace('__', '.'): np.zeros(s, np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize('edit, expected', [
    (drop('layer1.0.conv1.weight', 'fc.bias', 'bn1.running_var'),
     ['3 missing', 'missing layer1.0.conv1.weight', 'missing fc.bias', 'missing bn1.running_var']),
    (add('layer1.0.conv3.weight', 'head.weight'),
     ['2 unexpected', 'unexpected layer1.0.conv3.weight', 'unexpected head.weight']),
    (reshape(conv1__weight=(64, 3, 3, 3), fc__weight=(512, 1000)),
     ['2 mis-shaped', 'conv1.weight: expected (64, 3, 7, 7), got (64, 3, 3, 3)',
      'fc.weight: expected (1000, 512), got (512, 1000)']),
    (lambda sd: add('extra.bias')(reshape(bn1__bias=(65,))(drop('fc.weight')(sd))),
     ['1 missing, 1 unexpected, 1 mis-shaped', 'missing fc.weight', 'unexpected extra.bias',
      'bn1.bias: expected (64,), got (65,)']),
], ids=['missing', 'unexpected', 'mis-shaped', 'all-at-once'])
def test_every_mismatch_is_listed(edit, expected):
  with pytest.raises(CheckpointError) as error:
    convert_state_dict(edit(random_state_dict('resnet18')), 'resnet18')
  assert isinstance(error.value, ValueError)
  for text in expected:
    assert text in str(error.value)


def test_load_npz(tmp_path):
  state_dict = random_state_dict('cifar_resnet20')
  np.savez(tmp_path / 'w.npz', **state_dict)
  assert_trees_equal(load_state_dict(tmp_path / 'w.npz'), state_dict)


def test_load_url_downloads_once_into_the_cache(tmp_path):
  state_dict = random_state_dict('cifar_resnet20')
  source = tmp_path / 'remote' / 'resnet20.npz'
  source.parent.mkdir()
  np.savez(source, **state_dict)
  cache = tmp_path / 'cache'
  assert_trees_equal(load_state_dict(source.as_uri(), cache_dir=cache), state_dict)
  cached = list(cache.iterdir())
  assert len(cached) == 1 and cached[0].name.endswith('resnet20.npz')
  source.unlink()
  assert_trees_equal(load_state_dict(source.as_uri(), cache_dir=cache), state_dict)


def test_failed_download_leaves_no_file(tmp_path):
  cache = tmp_path / 'cache'
  with pytest.raises(OSError):
    load_state_dict((tmp_path / 'absent.npz').as_uri(), cache_dir=cache)
  assert not any(cache.iterdir())


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.pth'):
    load_state_dict(tmp_path / 'absent.pth')


@pytest.mark.parametrize('suffix', ['.npz', '.th'])
def test_truncated_file_names_the_path(tmp_path, suffix):
  if suffix == '.th':
    torch.save({'w': torch.ones(1000)}, tmp_path / 'full.th')
  else:
    np.savez(tmp_path / 'full.npz', w=np.ones(1000, np.float32))
  data = (tmp_path / f'full{suffix}').read_bytes()
  (tmp_path / f'cut{suffix}').write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=f'cut{suffix}'):
    load_state_dict(tmp_path / f'cut{suffix}')


def test_unsupported_suffix(tmp_path):
  (tmp_path / 'w.h5').write_bytes(b'\0')
  with pytest.raises(CheckpointError, match=r"'\.h5'.*\.npz, \.pth"):
    load_state_dict(tmp_path / 'w.h5')


def test_torch_file_without_torch_says_how_to_install(tmp_path, monkeypatch):
  (tmp_path / 'w.pth').write_bytes(b'\0')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r'pip install rapq-jax\[torch\]'):
    load_state_dict(tmp_path / 'w.pth')


def test_load_torch_checkpoint(tmp_path):
  state_dict = random_state_dict('cifar_resnet20')
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in state_dict.items()},
              'epoch': 3}, tmp_path / 'w.pth.tar')
  assert_trees_equal(load_state_dict(tmp_path / 'w.pth.tar'), state_dict)


def test_load_pretrained(tmp_path):
  state_dict = random_state_dict('cifar_resnet20')
  np.savez(tmp_path / 'w.npz', **state_dict)
  model, variables = load_pretrained(tmp_path / 'w.npz', 'cifar_resnet20')
  assert model == CifarResNet(num_blocks=3, num_classes=10)
  assert_trees_equal(variables, convert_state_dict(state_dict, 'cifar_resnet20'))


def cifar10_top1(model, variables, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 in percent over uint8 NHWC images, batches of 500."""

  @jax.jit
  def correct(variables, x, y):
    x = (x.astype(jnp.float32) / 255 - CIFAR_MEAN) / CIFAR_STD
    return jnp.sum(jnp.argmax(model.apply(variables, x, train=False), -1) == y)

  hits = sum(int(correct(variables, images[i:i + 500], labels[i:i + 500]))
             for i in range(0, len(images), 500))
  return 100 * hits / len(images)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize('depth, n, top1', [(20, 2000, 80.85), (56, 500, 83.6)])
def test_pretrained_cifar10_accuracy(shared_dir, depth, n, top1):
  """The converted checkpoints classify the first ``n`` CIFAR-10 test images as measured
  once (the whole split's 81.03 / 83.20, the shared data's stated figures, are checked
  for ResNet-20 through the CLI in test_run_cli and recorded for both in results/)."""
  model, variables = load_pretrained(shared_dir / f'models/cifar10_resnet{depth}.npz',
                                     f'cifar_resnet{depth}')
  with np.load(shared_dir / 'data/cifar10_jpeg/test.npz') as test:
    images, labels = test['images'], test['labels']
  assert len(images) == 10000
  assert abs(cifar10_top1(model, variables, images[:n], labels[:n]) - top1) <= 0.05


@pytest.mark.shared
@pytest.mark.parametrize('depth', [20, 56])
def test_torch_checkpoint_equals_npz(shared_dir, depth):
  models = pathlib.Path(shared_dir) / 'models'
  name = f'cifar_resnet{depth}'
  assert_trees_equal(convert_state_dict(load_state_dict(models / f'cifar10_resnet{depth}.th'), name),
                     convert_state_dict(load_state_dict(models / f'cifar10_resnet{depth}.npz'), name))
