"""Ghost-norm per-example gradient norms (gmix_jax/ghost_norm.py) against
vmapped per-example gradients, in float64, layer by layer and model by model."""
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fast_compile
from gmix_jax import ghost_norm, losses, models, objectives, partition, sensitivity

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
C = 3
# Each comparison is one compiled program, built once and run once, at the
# fast-compile options (fast_compile.py): the values compared do not depend on them.
_jit = fast_compile.jit


def _apply_fn(module):
  def apply_fn(params, model_state, x, train):
    return module.apply({'params': params, **model_state}, x), model_state
  return apply_fn


def _vmapped_sq(apply_fn, params, model_state, x, y):
  """Reference: ‖∇ℓ_i‖² from a per-example gradient of each example alone."""
  def one(xi, yi):
    loss = lambda p: losses.soft_cross_entropy(apply_fn(p, model_state, xi[None], False)[0],
                                               yi[None])[0]
    return sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(loss)(params)))
  return jax.vmap(one)(x, y)


def _labels(b, seed=2):
  return np.eye(C)[np.random.default_rng(seed).integers(0, C, b)]


def _random_variables(shapes, seed=5):
  """Random non-trivial float64 values of the shapes of ``module.init``'s
  variables (``jax.eval_shape``: traced, never compiled), drawn on the host.

  Parameters: 0.3·N(0, 1), plus N(0, 1/fan_in) for kernels and 1 for scales
  (roughly an initialisation plus a perturbation; zero-initialised heads and
  biases would hide terms). Other collections (running statistics): 0.5 +
  |0.3·N(0, 1)|, away from (0, 1), variances positive. The identity checked
  holds for any values; drawing them on the host keeps the random
  initialisers out of the compiled program (they took most of its compile time).
  """
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name, shape = str(getattr(path[-1], 'key', path[-1])), leaf.shape
    noise = 0.3 * rng.standard_normal(shape)
    if getattr(path[0], 'key', None) != 'params':
      return 0.5 + np.abs(noise)
    if name == 'scale':
      return 1 + noise
    if len(shape) >= 2:
      return noise + rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return noise
  variables = dict(jax.tree_util.tree_map_with_path(value, shapes))
  return variables.pop('params'), variables


def _ghost_and_reference(apply_fn, x, params, model_state):
  """(ghost norms, vmapped reference, the ghost-norm warnings) from ONE
  compiled program.

  Op-by-op dispatch would compile each of the hundreds of small operations
  separately; inside one jit the ghost-norm driver traces as it does in a
  training step, and raises its warnings while tracing, once.
  """
  y = _labels(x.shape[0])

  @_jit
  def both(params, model_state, x, y):
    got = ghost_norm.squared_norms(apply_fn, params, model_state, x, y, losses.soft_cross_entropy)
    return got, _vmapped_sq(apply_fn, params, model_state, x, y)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ghost_norm._WARNED.clear()
    got, want = both(params, model_state, x, y)
  return got, want, [str(w.message) for w in caught if 'ghost norm' in str(w.message)]


def _check(module, x, expect_warning=None, apply_fn=None):
  apply_fn = apply_fn or _apply_fn(module)
  params, model_state = _random_variables(jax.eval_shape(module.init, jax.random.PRNGKey(0), x))
  got, want, messages = _ghost_and_reference(apply_fn, x, params, model_state)
  if expect_warning is None:
    assert not messages, messages
  else:
    assert len(messages) == 1 and expect_warning in messages[0], messages
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-10)
  return got


def _x(*shape, seed=1):
  return np.random.default_rng(seed).standard_normal(shape)


class Head(nn.Module):
  """body(x) -> flatten -> Dense(C)."""
  body: nn.Module

  @nn.compact
  def __call__(self, x):
    h = self.body(x)
    return nn.Dense(C, **F64)(h.reshape(h.shape[0], -1))


class Seq(nn.Module):
  layers: tuple

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def test_outer_forms_agree_with_the_per_example_product(x64):
  # ghost (T²) and direct forms, and T = 1, against Σ_g ‖a_gᵀ d_g‖² by einsum
  for t, d, c in ((3, 16, 16), (20, 4, 4), (1, 5, 7)):
    a, g = _x(4, t, 2, d), _x(4, t, 2, c, seed=3)
    want = np.sum(np.einsum('btgd,btgc->bgdc', a, g) ** 2, (1, 2, 3))
    np.testing.assert_allclose(_jit(ghost_norm._outer_sq)(a, g), want, rtol=1e-12)


@pytest.mark.parametrize('shape', [(5, 6), (5, 3, 16), (5, 20, 4)],
                         ids=['vector', 'sequence_ghost', 'sequence_direct'])
def test_dense(x64, shape):
  width = shape[-1]
  _check(Head(Seq((nn.Dense(width, **F64), nn.tanh, nn.Dense(width, use_bias=False, **F64)))),
         _x(*shape))


class Attention(nn.Module):
  """DenseGeneral query/key/value ([T, d] -> [T, H, d/H]) and output ([T, H, d/H] -> [T, d])."""
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, **F64)(x, x)
    return nn.LayerNorm(**F64)(h)


def test_dense_general_and_attention(x64):
  _check(Head(Attention()), _x(4, 5, 6))


@pytest.mark.parametrize('kw', [
    dict(strides=2, padding='SAME'),
    dict(strides=(1, 2), padding='VALID', kernel_dilation=2),
    dict(padding=((1, 2), (0, 1)), input_dilation=2),
    dict(padding='CIRCULAR', feature_group_count=2),
    dict(kernel_size=(1, 1), feature_group_count=4, use_bias=False),
], ids=['stride_same', 'dilation_valid', 'explicit_pad_lhs_dilation', 'circular_groups',
        'depthwise'])
def test_conv(x64, kw):
  kw = {'kernel_size': (3, 3), **kw}
  _check(Head(Seq((nn.Conv(4, **kw, **F64), nn.relu))), _x(3, 7, 6, 4))


def test_conv1d_causal(x64):
  _check(Head(nn.Conv(3, (3,), padding='CAUSAL', kernel_dilation=2, **F64)), _x(3, 9, 2))


class BN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), **F64)(x)
    return nn.BatchNorm(use_running_average=True, **F64)(x)


def test_batchnorm_running_statistics(x64):
  _check(Head(BN()), _x(4, 5, 5, 2))


@pytest.mark.parametrize('norm', [
    functools.partial(nn.LayerNorm, **F64),
    functools.partial(nn.LayerNorm, reduction_axes=(1, 2, 3), feature_axes=(-2, -1), **F64),
    functools.partial(nn.GroupNorm, num_groups=2, **F64),
    functools.partial(nn.RMSNorm, **F64),
], ids=['layernorm', 'layernorm_two_feature_axes', 'groupnorm', 'rmsnorm'])
def test_norm_layers(x64, norm):
  _check(Head(Seq((nn.Conv(4, (3, 3), **F64), norm(), nn.relu))), _x(3, 5, 5, 2))


class Tokens(nn.Module):
  vocab: int
  shared_twice: bool = False

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, 6, **F64)
    h = embed(ids)
    dense = nn.Dense(6, **F64)
    h = dense(h)
    if self.shared_twice:            # the same Dense (one kernel) on a second input
      h = h + dense(jnp.tanh(h))
    return h.mean(1)


@pytest.mark.parametrize('t,vocab', [(5, 7), (9, 4)], ids=['ghost', 'direct'])
def test_embed(x64, t, vocab):
  ids = jax.random.randint(jax.random.PRNGKey(4), (4, t), 0, vocab)   # with repeats
  _check(Head(Tokens(vocab)), ids)


def test_module_called_twice_is_exact(x64):
  _check(Head(Tokens(7, shared_twice=True)), jax.random.randint(jax.random.PRNGKey(4), (4, 5), 0, 7))


class Scaled(nn.Module):
  """A raw parameter no rule knows (the fallback path)."""
  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.ones, (x.shape[-1],), jnp.float64)
    return nn.Dense(5, **F64)(x * w)


def test_unknown_layer_falls_back_and_warns_once_naming_it(x64):
  _check(Head(Scaled()), _x(4, 6), expect_warning='parameters of body;')


def test_batch_statistics_fall_back_to_single_examples(x64):
  class TrainBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(C, **F64)(nn.BatchNorm(use_running_average=False, **F64)(nn.Dense(4, **F64)(x)))
  module = TrainBN()
  x = _x(4, 3)
  def apply_fn(params, model_state, x, train):
    out, _ = module.apply({'params': params, **model_state}, x, mutable=['batch_stats'])
    return out, model_state
  # a single example's batch statistics: x̂ = 0, so only the biases carry gradient;
  # the reference (vmapped single examples) and the fallback agree
  _check(module, x, expect_warning='batch statistics', apply_fn=apply_fn)


TINY = {
    'mlp': (functools.partial(models.MLP, hidden_sizes=(8, 6)), (6, 6, 1)),
    'cnn': (functools.partial(models.CNN, width=4, norm='batch'), (8, 8, 1)),
    'resnet18': (functools.partial(models.ResNet18, width=2, stage_sizes=(1, 1, 1, 1)), (8, 8, 3)),
    'preact_resnet18': (functools.partial(models.PreActResNet18, width=2,
                                          stage_sizes=(1, 1, 1, 1)), (8, 8, 3)),
    'wrn': (functools.partial(models.WideResNet, depth=10, width=1), (8, 8, 3)),
    'resnet50': (functools.partial(models.ResNet50, width=2, stage_sizes=(1, 1, 1, 1)),
                 (16, 16, 3)),
    'vit': (functools.partial(models.ViT, patch=4, width=8, depth=1, mlp_dim=8, num_heads=2),
            (8, 8, 3)),
}


def test_tiny_registry_covers_every_model_class():
  classes = {type(models.get_model(n, C)) for n in models.MODELS}
  assert classes == {type(f(num_classes=C)) for f, _ in TINY.values()}


@pytest.mark.parametrize('name', sorted(TINY))
def test_every_model(x64, name):
  make, shape = TINY[name]
  module = make(num_classes=C, **F64)
  x = _x(3, *shape)
  params, state = _random_variables(
      jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), x))
  got, want, fallback = _ghost_and_reference(models.make_apply_fn(module), x, params, state)
  # ViT's class token and position embedding are raw parameters: the fallback
  assert fallback == ([] if name != 'vit' else [
      'ghost norm: no rule for the parameters of (top); their per-example gradients are vmapped'])
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_bgmix_ranking_equals_the_vmapped_first_order():
  module = models.CNN(num_classes=10, width=8, norm='batch')
  params, state = models.init_model(module, jax.random.PRNGKey(0), (12, 12, 1))
  state = jax.tree.map(lambda v: jnp.abs(v) + 0.5, state)
  apply_fn = models.make_apply_fn(module)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 12, 12, 1))
  y = jax.nn.one_hot(jnp.arange(32) % 10, 10)
  method = objectives.get_method('bgmix', 10, sensitivity={'estimator': 'first_order'})
  k = partition.num_sensitive(method.partition.gamma, 32)

  @_jit                          # both in one program
  def both(params, state, x, y):
    return (sensitivity.scores(method.sensitivity, apply_fn, params, state, x, y, 0.05),
            sensitivity.first_order(apply_fn, params, state, x, y, 0.05, ghost=False))
  ghost, vmapped = both(params, state, x, y)
  np.testing.assert_allclose(ghost, vmapped, rtol=1e-4)
  a, b = partition.top_k_split(ghost, k), partition.top_k_split(vmapped, k)
  np.testing.assert_array_equal(np.sort(a.sensitive), np.sort(b.sensitive))
