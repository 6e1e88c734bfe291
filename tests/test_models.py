"""Tests for gmix_jax.models: registry, shapes, parameter counts, BatchNorm contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmix_jax import models
from gmix_jax.models import (CNN, PreActResNet, ResNet, WideResNet, count_params,
                             get_model, init_model, make_apply_fn)

BN_NAMES = ('resnet18', 'preact_resnet18', 'wrn28', 'wrn28_2', 'wrn28_10', 'resnet50')

# These tests check semantics, not speed: compile without backend optimisation,
# which is several times faster to compile on XLA:CPU for these tiny programs.
jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def normal(seed, shape):
  # NumPy, not jax.random: each eager jax.random call compiles a program.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def jit_apply(module):
  return jit(make_apply_fn(module), static_argnums=3)


def abstract_init(module, input_shape, batch=2):
  """Variables as ShapeDtypeStructs: traced, never compiled or run."""
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  return jax.eval_shape(
      lambda rng, x: module.init(rng, x, train=False), jax.random.key(0), x)


# --- Registry ----------------------------------------------------------------

IMAGENET_NAMES = ('resnet50', 'vit_ti16', 'vit_s16', 'vit_b16', 'vit_b32')


# The ImageNet models are traced at full size by test_imagenet_parameter_counts
# and run shrunk by test_tiny_imagenet_models_run_forward_and_backward.
@pytest.mark.parametrize('name', sorted(set(models.MODELS) - set(IMAGENET_NAMES)))
@pytest.mark.parametrize('train', [False, True])
def test_every_name_gives_float32_logits_default_size(name, train):
  # Full-size defaults, shapes only (jax.eval_shape: no compile, no FLOPs).
  module = get_model(name, num_classes=7)
  input_shape = (64,) if name == 'mlp' else (32, 32, 3)
  variables = abstract_init(module, input_shape)
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  assert set(model_state) == ({'batch_stats'} if name in BN_NAMES else set())
  x = jax.ShapeDtypeStruct((5, *input_shape), jnp.float32)
  logits, new_state = jax.eval_shape(
      lambda p, s, x: make_apply_fn(module)(p, s, x, train), params,
      model_state, x)
  assert logits.shape == (5, 7) and logits.dtype == jnp.float32
  assert jax.tree.structure(new_state) == jax.tree.structure(model_state)


TINY = {
    'mlp': (dict(hidden_sizes=(16,)), (64,)),
    'cnn': (dict(width=4), (8, 8, 1)),
    'resnet18': (dict(width=4), (8, 8, 3)),
    'preact_resnet18': (dict(width=4), (8, 8, 3)),
    # WRN runs for real below at depth 10; depth 28 is covered by eval_shape.
}
# ImageNet models, shrunk (their forward and backward run in one test below).
TINY_IMAGENET = {
    'resnet50': (dict(stage_sizes=(1, 1), width=4), (16, 16, 3)),
    'vit_ti16': (dict(patch=8, width=16, depth=2, mlp_dim=32, num_heads=2), (16, 16, 3)),
}


@pytest.mark.parametrize('name', sorted(TINY))
def test_tiny_models_run(name):
  kwargs, input_shape = TINY[name]
  module = get_model(name, num_classes=3, **kwargs)
  params, model_state = init_model(module, jax.random.key(0), input_shape)
  apply_fn = jit_apply(module)
  x = normal(1, (4, *input_shape))
  for train in (False, True):
    logits, new_state = apply_fn(params, model_state, x, train)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert jax.tree.structure(new_state) == jax.tree.structure(model_state)


def test_init_model_splits_collections():
  params, state = init_model(get_model('mlp', 10, hidden_sizes=(8, 8)),
                             jax.random.key(0), (64,))
  assert state == {}
  assert count_params(params) == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
  params, state = init_model(get_model('cnn', 10, width=2, norm='batch'),
                             jax.random.key(0), (8, 8, 1))
  assert set(state) == {'batch_stats'} and 'bn0' in state['batch_stats']


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='model.name') as err:
    get_model('resnet19', num_classes=10)
  for name in models.MODELS:
    assert name in str(err.value)


def test_bfloat16_compute_gives_float32_logits_and_rank3_input():
  module = CNN(num_classes=3, width=4, norm='batch', dtype=jnp.bfloat16)
  params, state = init_model(module, jax.random.key(0), (8, 8))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = normal(1, (2, 8, 8))
  apply_fn = jit_apply(module)
  logits, _ = apply_fn(params, state, x, False)
  assert logits.dtype == jnp.float32
  # A (B, H, W) input is read as single-channel images.
  logits4, _ = apply_fn(params, state, x[..., None], False)
  np.testing.assert_array_equal(logits, logits4)
  # Shapes only for a large bf16 model.
  out = jax.eval_shape(
      lambda x: ResNet(num_classes=3, dtype=jnp.bfloat16).init_with_output(
          jax.random.key(0), x)[0], jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8))
  assert out.dtype == jnp.float32


# --- Parameter counts (abstract init only) --------------------------------------

def wrn_param_count(depth, k, num_classes):
  """Closed-form count for WRN-d-k, written out layer by layer.

  Convs have no bias; each BN has scale + bias; projection shortcut only in the
  first block of each stage (channels change there: 16 -> 16k is a change for
  k > 1).
  """
  n = (depth - 4) // 6
  total = 3 * 16 * 9  # stem conv
  c_in = 16
  for c in (16 * k, 32 * k, 64 * k):
    for b in range(n):
      cin = c_in if b == 0 else c
      total += 2 * cin + cin * c * 9 + 2 * c + c * c * 9
      if b == 0 and cin != c:
        total += cin * c
    c_in = c
  return total + 2 * c_in + c_in * num_classes + num_classes


@pytest.mark.parametrize('name,kwargs,expected', [
    # kuangliu/pytorch-cifar ResNet18, 10 classes: the widely quoted figure.
    ('resnet18', {}, 11_173_962),
    # kuangliu/pytorch-cifar (and the mixup reference) PreActResNet18 has
    # 11,171,146; ours adds the final BN -> ReLU of He et al.'s identity-mapping
    # paper: one BN on 512 channels = 1,024 more.
    ('preact_resnet18', {}, 11_171_146 + 2 * 512),
    # WRN-28-10: 36,479,194 is the count of the PyTorch reference
    # (xternalz/WideResNet-pytorch); the closed form agrees.
    ('wrn28', {}, 36_479_194),
    ('wrn28_10', {}, wrn_param_count(28, 10, 10)),
    # WRN-28-2, "1.5M" in the FixMatch/MixMatch papers.
    ('wrn28_2', {}, wrn_param_count(28, 2, 10)),
    ('wrn28', {'width': 2}, 1_467_610),
])
def test_parameter_counts(name, kwargs, expected):
  variables = abstract_init(get_model(name, 10, **kwargs), (32, 32, 3), batch=1)
  assert count_params(variables['params']) == expected


def test_wrn_closed_form_matches_reference_figure():
  assert wrn_param_count(28, 10, 10) == 36_479_194


# --- BatchNorm contract -----------------------------------------------------------

BN_TINY = {
    'cnn': functools.partial(CNN, width=4, norm='batch'),
    'resnet': functools.partial(ResNet, stage_sizes=(1, 1), width=4),
    'preact': functools.partial(PreActResNet, stage_sizes=(1, 1), width=4),
    'wrn': functools.partial(WideResNet, depth=10, width=1),
}


def randomize_stats(model_state, seed):
  """Running statistics far from their (0, 1) initialisation."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: rng.uniform(0.5, 2.0, l.shape).astype(l.dtype), model_state)


@pytest.mark.parametrize('name', sorted(BN_TINY))
def test_eval_mode_is_per_example_and_keeps_state(name):
  module = BN_TINY[name](num_classes=5)
  params, state = init_model(module, jax.random.key(0), (8, 8, 3))
  state = randomize_stats(state, 1)
  apply_fn = make_apply_fn(module)
  x = normal(2, (6, 8, 8, 3))

  def batch_logits(x):
    logits, new_state = apply_fn(params, state, x, False)
    assert new_state is state  # Checked while tracing: the same object back.
    return logits

  logits = jit(batch_logits)(x)
  single = jit(lambda xi: apply_fn(params, state, xi[None], False)[0][0])
  looped = jnp.stack([single(xi) for xi in x])
  np.testing.assert_allclose(logits, looped, rtol=1e-5, atol=1e-5)

  # Sanity check that the comparison can fail: in train mode, example 0's
  # logits change when the rest of the batch changes.
  train_logits = jit(lambda x: apply_fn(params, state, x, True)[0])
  x_other = x.copy()
  x_other[1:] *= 3.0
  a, b = train_logits(x), train_logits(x_other)
  assert not np.allclose(a[0], b[0], atol=1e-3)


def conv_nhwc(x, kernel, stride):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('name,conv,bn,stride', [
    ('cnn', 'conv0', 'bn0', 2),
    ('resnet', 'stem_conv', 'stem_bn', 1),
])
def test_train_mode_updates_running_stats(name, conv, bn, stride):
  module = BN_TINY[name](num_classes=5, bn_momentum=0.9)
  params, state = init_model(module, jax.random.key(0), (8, 8, 3))
  state = randomize_stats(state, 1)
  x = normal(2, (16, 8, 8, 3)) * 2.0 + 0.5
  _, new_state = jit_apply(module)(params, state, x, True)

  # Independent recomputation of the first BN layer's input (bias-free conv).
  h = conv_nhwc(x, params[conv]['kernel'], stride)
  old = state['batch_stats'][bn]
  new = new_state['batch_stats'][bn]
  np.testing.assert_allclose(
      new['mean'], 0.9 * old['mean'] + 0.1 * h.mean(axis=(0, 1, 2)),
      rtol=1e-4, atol=1e-5)
  # Flax's running variance uses the biased batch variance (PyTorch: unbiased).
  np.testing.assert_allclose(
      new['var'], 0.9 * old['var'] + 0.1 * h.var(axis=(0, 1, 2)),
      rtol=1e-4, atol=1e-5)
  # Every BN layer's statistics moved.
  for o, n in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert not np.allclose(o, n)


# --- Dropout (WRN) ----------------------------------------------------------------

def test_wrn_dropout_needs_train_and_rng():
  module = WideResNet(num_classes=4, depth=10, width=1, dropout_rate=0.5)
  params, state = init_model(module, jax.random.key(0), (8, 8, 3))
  apply_fn = jit_apply(module)
  x = normal(1, (3, 8, 8, 3))
  no_rng, _ = apply_fn(params, state, x, True)
  with_rng, _ = apply_fn(params, state, x, True, jax.random.key(2))
  other_rng, _ = apply_fn(params, state, x, True, jax.random.key(3))
  assert not np.allclose(no_rng, with_rng)
  assert not np.allclose(with_rng, other_rng)
  # No rng: dropout is the identity, so it equals a dropout-free twin.
  twin = WideResNet(num_classes=4, depth=10, width=1)
  np.testing.assert_allclose(
      no_rng, jit_apply(twin)(params, state, x, True)[0], rtol=1e-5, atol=1e-6)


# --- ImageNet models: published counts, tiny variants, bfloat16 -----------------

def vit_param_count(patch, width, depth, mlp, classes, tokens, cls_token=True):
  """ViT parameters written out layer by layer (Dosovitskiy et al., Table 1 sizes)."""
  block = (2 * 2 * width                      # two LayerNorms
           + 4 * (width * width + width)      # q, k, v, out projections with bias
           + width * mlp + mlp + mlp * width + width)
  return (patch * patch * 3 * width + width   # patch embedding
          + (width if cls_token else 0) + (tokens + cls_token) * width
          + depth * block + 2 * width + width * classes + classes)


@pytest.mark.parametrize('name,kwargs,expected', [
    ('resnet50', {}, 25_557_032),             # torchvision resnet50
    ('vit_b16', {}, 86_567_656),              # timm vit_base_patch16_224
    ('vit_b16', {'pool': 'gap'}, vit_param_count(16, 768, 12, 3072, 1000, 196, False)),
    ('vit_b32', {}, vit_param_count(32, 768, 12, 3072, 1000, 49)),
    ('vit_s16', {}, vit_param_count(16, 384, 12, 1536, 1000, 196)),
    ('vit_ti16', {}, vit_param_count(16, 192, 12, 768, 1000, 196)),
])
def test_imagenet_parameter_counts(name, kwargs, expected):
  variables = abstract_init(get_model(name, 1000, **kwargs), (224, 224, 3), batch=1)
  assert count_params(variables['params']) == expected


def test_vit_closed_form_matches_published_figure():
  assert vit_param_count(16, 768, 12, 3072, 1000, 196) == 86_567_656


def tiny(name, **kwargs):
  return get_model(name, 3, **{**TINY_IMAGENET[name][0], **kwargs})


@pytest.mark.parametrize('name', sorted(TINY_IMAGENET))
def test_tiny_imagenet_models_run_forward_and_backward(name):
  module, shape = tiny(name), TINY_IMAGENET[name][1]
  variables = abstract_init(module, shape)   # random values of the right shapes: no init compile
  params = jax.tree.map(lambda p: 0.3 * normal(4, p.shape), variables['params'])
  state = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), variables.get('batch_stats', {}))
  state = {'batch_stats': state} if state else {}
  x, y = normal(1, (4, *shape)), jnp.arange(4) % 3

  def loss(p):
    logits, new_state = make_apply_fn(module)(p, state, x, True)
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  grads = jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(float(np.abs(g).sum()) > 0 for g in leaves)


def test_resnet50_zero_init_residual_zeroes_each_blocks_last_bn_scale():
  params, _ = init_model(get_model('resnet50', 3, stage_sizes=(1, 1), width=2,
                                   zero_init_residual=True), jax.random.key(0), (8, 8, 3))
  blocks = [b for b in params if b.startswith('stage')]
  assert len(blocks) == 2
  for b in blocks:    # the last BN's scale is 0, the other BNs' scales are 1
    assert np.all(params[b]['BatchNorm_2']['scale'] == 0)
    assert np.all(params[b]['BatchNorm_1']['scale'] == 1)


def intermediates_dtypes(module, params, state, x, train):
  """{path: dtype} of every submodule's output (abstract trace, nothing runs)."""
  def run(params, state, x):
    return module.apply({'params': params, **state}, x, train=train,
                        capture_intermediates=True, mutable=['intermediates', *state])[1]
  inter = jax.eval_shape(run, params, state, x)['intermediates']
  return {jax.tree_util.keystr(k): v.dtype
          for k, v in jax.tree_util.tree_flatten_with_path(inter)[0]}


@pytest.mark.parametrize('name', ['resnet50', 'vit_ti16', 'cnn', 'mlp', 'resnet18',
                                  'preact_resnet18', 'wrn28'])
def test_bfloat16_lowers_activations_only(name):
  kwargs, shape = {**TINY, **TINY_IMAGENET}.get(name, (dict(depth=10, width=1), (8, 8, 3)))
  module = get_model(name, 3, dtype='bfloat16', **kwargs)
  variables = abstract_init(module, shape)   # abstract: dtypes without compiling
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  dtypes = intermediates_dtypes(module, params, state,
                                jax.ShapeDtypeStruct((2, *shape), jnp.float32), True)
  logits = [k for k in dtypes if k.startswith("['__call__']")]
  layers = [k for k in dtypes if k not in logits]
  assert len(logits) == 1 and len(layers) >= 2
  assert all(dtypes[k] == jnp.bfloat16 for k in layers), dtypes   # every layer's output
  assert dtypes[logits[0]] == jnp.float32                         # logits, cast at the head


def test_bfloat16_batchnorm_keeps_float32_statistics():
  module = get_model('resnet50', 3, dtype='bfloat16', stage_sizes=(1,), width=4)
  variables = abstract_init(module, (16, 16, 3))
  params = jax.tree.map(lambda p: 0.3 * normal(4, p.shape), variables['params'])
  state = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), {'batch_stats': variables['batch_stats']})
  x = normal(1, (4, 16, 16, 3)) * 3 + 1
  _, new_state = jit_apply(module)(params, state, x, True)
  ref_module = get_model('resnet50', 3, stage_sizes=(1,), width=4)
  _, ref_state = jit_apply(ref_module)(params, state, x, True)
  for new, ref in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
    assert new.dtype == jnp.float32
    # Statistics from bf16 activations, accumulated in f32: close to the f32 model's.
    np.testing.assert_allclose(new, ref, rtol=0.05, atol=0.05)


def test_bad_model_dtype_is_named():
  with pytest.raises(ValueError, match='model.dtype must be one of float32, bfloat16, float16'):
    get_model('cnn', 3, dtype='bf16')
