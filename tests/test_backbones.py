"""ResNet and HRNet against their PyTorch references (fixtures from tests/make_backbone_fixtures.py:
torchvision's ResNet, mmpose 0.29's HRNet + the official conv_block1/2), random weights,
BatchNorm in eval mode (float32) and training mode (batch statistics, running-statistics update;
features and statistics in float32 and float64, gradients in float64), at tiny sizes and (slow)
at the full ResNet-50 / HRNet-W32 sizes; the backbone registry and configs; the importers' and
converters' errors."""
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from backbone_weights import random_weights
from conftest import REPO

from capenext_jax import params as params_lib
from capenext_jax.convert import backbones as backbone_convert
from capenext_jax.convert import conv_nets, official
from capenext_jax.convert import hrnet as hrnet_convert
from capenext_jax.convert import resnet as resnet_convert
from capenext_jax.models import backbones
from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.models.hrnet import HRNet, HRNetBackbone, HRNetConfig
from capenext_jax.models.layers import init_rngs
from capenext_jax.models.resnet import ResNet, ResNetConfig

FIXTURES = REPO / 'tests' / 'fixtures'


def load_case(name):
  """(our module holding the fixture's weights, its torch-name rename, the fixture)."""
  z = np.load(FIXTURES / f'backbone_{name}.npz', allow_pickle=False)
  weights = random_weights(json.loads(str(z['weights_json'])), seed=0)
  fields = {k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads(str(z['config_json'])).items()}
  if name.startswith('resnet'):
    config = ResNetConfig(**fields)
    model = ResNet(config, rngs=nnx.Rngs(0))
    params_lib.load_into(model, resnet_convert.resnet_from_torch(weights, config))
    rename = resnet_convert._rename
  else:
    model = HRNetBackbone(HRNetConfig(**fields), rngs=nnx.Rngs(0))
    params_lib.load_into(model, hrnet_convert.hrnet_from_official(weights))
    rename = hrnet_convert._rename
  return model, rename, z


def relative_norm(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


# Full-size backbones whose parity check is jitted (check_parity says why only these).
JITTED_FULL_SIZE = ('resnet50',)


def check_parity(name, full_size=False):
  """Both modes against the fixture (references in float64: tests/make_backbone_fixtures.py's
  docstring says why). Eval mode: float32, with gradients. Training mode: features and running
  statistics in float32 and float64, gradients in float64 (float32 training-mode gradients
  depend on round-off).

  full_size: one run per mode in float64, the training run with gradients (at full depth
  float32 eval-mode gradients depend on round-off too: hrnet_w32's d_x is 4e-4 from float64
  torch's). The eval-mode backward differs from the training one only in BatchNorm (an affine
  map of the running statistics there), which the small size checks with gradients; at full
  size it cost as long as the training run (hrnet_w32 op by op, 74 s for both). HRNet-W32
  runs op by op instead of jitted: XLA compiles its many-branch backward pass for longer than
  op by op compiles one kernel per distinct layer shape (test alone, suite's XLA settings:
  35 s op by op, 77 s jitted). ResNet-50 is jitted: the other way round (13 s jitted, 18 s op
  by op; 16 s against 23-26 s beside another test's work on 2 cores)."""
  model, rename, z = load_case(name)
  if full_size:
    runs = (('eval', 'float64', False), ('train', 'float64', True))
  else:
    runs = (('eval', 'float32', True), ('train', 'float32', False), ('train', 'float64', True))
  for mode, dtype, check_grads in runs:
    model.train() if mode == 'train' else model.eval()
    with _x64(dtype == 'float64'):
      check_mode(model, rename, z, mode, jnp.dtype(dtype), check_grads,
                 jit=not full_size or name in JITTED_FULL_SIZE)


@contextlib.contextmanager
def _x64(enabled: bool):
  """jax_enable_x64 for the duration (a global flag: restored on exit)."""
  before = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', enabled or before)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', before)


def check_mode(model, rename, z, mode, dtype, check_grads, jit=True):
  name = f'{mode} {dtype.name}'
  cast = lambda tree: jax.tree.map(
      lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
  params, stats, rest = (
      cast(nnx.to_pure_dict(s)) for s in nnx.split(model, nnx.Param, nnx.BatchStat, ...)[1:])
  graphdef = nnx.graphdef(model)
  x, cotangent = jnp.asarray(z['x'], dtype), jnp.asarray(z['cotangent'], dtype)

  def loss(params, stats, x):   # as the train step: pure dicts in, statistics out
    m = nnx.merge(graphdef, params, stats, rest)
    out = m(x)
    return jnp.sum(out * cotangent), (out, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))

  compile = jax.jit if jit else (lambda f: f)
  with jax.default_matmul_precision('highest'):
    if check_grads:
      grad = compile(jax.grad(loss, argnums=(0, 2), has_aux=True))
      (d_params, d_x), (out, new_stats) = grad(params, stats, x)
    else:   # the forward alone compiles in a fraction of the time
      out, new_stats = compile(loss)(params, stats, x)[1]
  assert out.dtype == dtype
  ref = z[f'{mode}_out']
  assert out.shape == ref.shape
  err = np.max(np.abs(np.asarray(out) - ref))
  assert err <= 1e-5 * np.max(np.abs(ref)), f'{name}: features off by {err}'
  if check_grads:
    d_x_err = relative_norm(d_x, z[f'{mode}_d_x'])
    assert d_x_err <= 1e-4, f'{name}: d_x off by {d_x_err} (norm-wise)'
    grads = conv_nets.to_torch(d_params, rename)
    stored = [k for k in z.files if k.startswith(f'{mode}_grad/')]
    assert len(stored) > 20
    bad = [(k, relative_norm(grads[k.split('/', 1)[1]], z[k])) for k in stored
           if relative_norm(grads[k.split('/', 1)[1]], z[k]) > 1e-4]
    assert not bad, f'{name}: weight grads {bad[:5]}'
  after = conv_nets.to_torch(new_stats, rename)
  if mode == 'train':
    ref_stats = {k.split('/', 1)[1]: z[k] for k in z.files if k.startswith('train_stat/')}
    # ResNet's reference also holds layer4, which neither model runs.
    assert set(after) <= set(ref_stats) and len(after) > 10
    for k, want in ((k, ref_stats[k]) for k in after):
      assert np.max(np.abs(after[k] - want)) <= 1e-5 * np.max(np.abs(want)), f'{name}: {k}'
  else:   # eval mode leaves the statistics alone
    jax.tree.map(np.testing.assert_array_equal, after, conv_nets.to_torch(stats, rename))


@pytest.mark.parametrize('name', ['resnet_tiny', 'hrnet_tiny'])
def test_parity_with_pytorch_references(name):
  check_parity(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet50', 'hrnet_w32'])
def test_full_size_parity_with_pytorch_references(name):
  """The official ResNet-50 (to stage 3) and HRNet-W32 + conv_block1/2 at 64 px, batch 2. The
  stage-4 branch of HRNet is 2x2 there: its training-mode BatchNorms see 8 values per channel
  and small variances, which catches statistics computed in less than the input's precision."""
  check_parity(name, full_size=True)


# ----------------------------------------------------------------------------- configs, registry
def test_presets_and_config_dicts():
  for name, (arch, channels) in {'resnet50': ('resnet', 1024), 'hrnet_w32': ('hrnet', 512),
                                 'swinv2_t': ('swin_v2', 768)}.items():
    c = CapeNextConfig.variant(name)
    assert backbones.arch_of(c.backbone) == arch and c.image_size == 256
    assert c.head.img_in_channels == c.backbone.num_features == channels
    assert c.backbone.output_resolution == 16
    assert CapeNextConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  # A Swin-only dict of before the backbone choice still loads.
  old = CapeNextConfig().to_dict()
  old['swin'] = {k: v for k, v in old.pop('backbone').items() if k != 'arch'}
  assert CapeNextConfig.from_dict(old) == CapeNextConfig()
  with pytest.raises(ValueError, match=r"backbone 'resnet51'.*resnet50"):
    CapeNextConfig.variant('resnet51')
  bad = CapeNextConfig.variant('resnet50').to_dict()
  bad['backbone']['arch'] = 'resnet_v9'
  with pytest.raises(ValueError, match=r"backbone.arch: 'resnet_v9'"):
    CapeNextConfig.from_dict(bad)
  bad['backbone'] = dict(CapeNextConfig.variant('resnet50').to_dict()['backbone'], depth=50)
  with pytest.raises(ValueError, match=r"unknown fields \['depth'\] for ResNetConfig"):
    CapeNextConfig.from_dict(bad)
  from configs import mp100
  assert mp100.get_config('backbone=hrnet_w32').model.backbone.arch == 'hrnet'
  local = CapeNextConfig.from_dict(mp100.get_config('backbone=resnet50,runlocal').model.to_dict())
  assert local.backbone == backbones.PRESETS['resnet_tiny'].config(64)


# ----------------------------------------------------------------------------- converters
def torchvision_layout(config: ResNetConfig, stages=4) -> dict:
  """Random weights named as torchvision's ResNet with `stages` stages and its classifier."""
  blocks = config.stage_blocks + (1,) * (stages - len(config.stage_blocks))
  big = ResNetConfig(img_size=config.img_size, stage_blocks=blocks, base_width=config.base_width)
  shapes = {k: v.shape for k, v in conv_nets.to_torch(
      _zeros(lambda: ResNet(big, rngs=nnx.Rngs(0))), resnet_convert._rename).items()}
  shapes['fc.weight'], shapes['fc.bias'] = (10, big.num_features), (10,)
  return random_weights(shapes, seed=1)


def _zeros(module_fn):
  shapes = conv_nets.expected_weights(module_fn)
  return params_lib.unflatten({k: np.zeros(s, np.float32) for k, s in shapes.items()})


def test_torchvision_release_and_official_round_trip(tmp_path):
  import torch
  config = backbones.PRESETS['resnet_tiny'].config(64)
  sd = torchvision_layout(config)
  sd['layer1.0.bn1.num_batches_tracked'] = np.int64(7)
  torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, tmp_path / 'resnet.pth')
  weights = resnet_convert.load_torchvision_resnet(tmp_path / 'resnet.pth', config)
  back = resnet_convert.resnet_to_torch(weights)
  assert set(back) == {k for k in sd if not k.startswith(('layer4.', 'fc.'))
                       and 'num_batches' not in k}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])
  # The official checkpoint's groups, both directions (HRNet's conv_block* at model level).
  model_cfg = CapeNextConfig.variant('hrnet_tiny', image_size=64, fusion=False)
  model = nnx.eval_shape(lambda: CapeNext(model_cfg, rngs=init_rngs(0)))
  ours = jax.tree.map(lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(
      np.float32), nnx.to_pure_dict(nnx.state(model, params_lib.WEIGHTS)))
  sd = official.capenext_to_official(ours)
  assert 'conv_block1.0.weight' in sd and 'backbone.conv_block1.0.weight' not in sd
  assert 'backbone.stage2.0.branches.0.0.conv1.weight' in sd
  again = official.capenext_from_official(sd)
  jax.tree.map(np.testing.assert_array_equal, params_lib.flatten(again),
               params_lib.flatten(ours))
  assert backbones.arch_of(official.official_model_config(sd).backbone) == 'hrnet'


def test_imagenet_hrnet_layout_skips_the_classifier_only(tmp_path):
  config = backbones.PRESETS['hrnet_tiny'].config(64)
  hrnet_sd = {k: v for k, v in conv_nets.to_torch(
      _zeros(lambda: HRNetBackbone(config, rngs=nnx.Rngs(0))), hrnet_convert._rename).items()
      if not k.startswith('conv_block')}
  last = f'stage4.{config.num_modules[-1] - 1}'
  extra = {'incre_modules.0.0.conv1.weight': np.zeros((4, 8, 1, 1), np.float32),
           'classifier.weight': np.zeros((1000, 2048), np.float32),
           f'{last}.fuse_layers.1.0.0.0.weight': np.zeros((16, 8, 3, 3), np.float32)}
  np.savez(tmp_path / 'hrnet_w32.npz', **hrnet_sd, **extra)
  weights = hrnet_convert.load_imagenet_hrnet(tmp_path / 'hrnet_w32.npz', config)
  assert set(params_lib.flatten(weights)) == set(conv_nets.expected_weights(
      lambda: HRNet(config, rngs=nnx.Rngs(0))))
  # Anything else unknown is an error naming the file and the key.
  np.savez(tmp_path / 'odd.npz', **hrnet_sd, **{'stage2.0.extra.weight': np.zeros(3)})
  with pytest.raises(ValueError, match=r"odd\.npz.*unexpected keys \['stage2\.0\.extra"):
    hrnet_convert.load_imagenet_hrnet(tmp_path / 'odd.npz', config)


def test_init_from_pretrained_errors_name_backbone_file_and_key(tmp_path):
  from capenext_jax import loading
  model = CapeNext(CapeNextConfig.variant('resnet_tiny', image_size=64), rngs=nnx.Rngs(0))
  config = model.config.backbone
  good = torchvision_layout(config)
  np.savez(tmp_path / 'resnet.npz', **good)
  loading.init_from_pretrained(model, backbone_path=tmp_path / 'resnet.npz')
  np.testing.assert_array_equal(model.backbone.bn1.mean[...], good['bn1.running_mean'])
  np.testing.assert_array_equal(model.backbone.conv1.kernel[...],
                                good['conv1.weight'].transpose(2, 3, 1, 0))
  missing = {k: v for k, v in good.items() if k != 'layer2.0.bn2.running_var'}
  np.savez(tmp_path / 'missing.npz', **missing)
  with pytest.raises(ValueError, match=r"resnet backbone: .*missing\.npz.*missing keys "
                                       r"\['layer2\.0\.bn2\.running_var'\]"):
    loading.init_from_pretrained(model, backbone_path=tmp_path / 'missing.npz')
  np.savez(tmp_path / 'extra.npz', **good, **{'layer1.0.conv9.weight': np.zeros(1)})
  with pytest.raises(ValueError, match=r"extra\.npz.*unexpected keys \['layer1\.0\.conv9"):
    loading.init_from_pretrained(model, backbone_path=tmp_path / 'extra.npz')
  # Another size of the architecture: the shape is named.
  wide = torchvision_layout(ResNetConfig(img_size=64, stage_blocks=(1, 1, 1), base_width=32))
  np.savez(tmp_path / 'wide.npz', **wide)
  with pytest.raises(ValueError, match=r"wide\.npz: ResNet backbone: layer1\.0\.\w+\.\w+ has "
                                       r"shape \(32,.*\), the model needs \(8,"):
    loading.init_from_pretrained(model, backbone_path=tmp_path / 'wide.npz')
  # Another architecture's file.
  np.savez(tmp_path / 'swin.npz', **{'patch_embed.proj.weight': np.zeros((96, 3, 4, 4))})
  with pytest.raises(ValueError, match=r"resnet backbone: .*swin\.npz: not a torchvision "
                                       r"ResNet.*patch_embed"):
    loading.init_from_pretrained(model, backbone_path=tmp_path / 'swin.npz')


def test_official_backbone_keys_of_no_known_architecture():
  with pytest.raises(ValueError, match=r'fit no known backbone architecture'):
    backbone_convert.official_arch({'blocks.0.attn.qkv.weight'})
