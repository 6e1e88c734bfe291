"""The README's Python examples run and do what they say."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _blocks():
  with open(README) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


def test_readme_has_the_two_examples():
  blocks = _blocks()
  assert any('transforms.sam' in b for b in blocks)
  assert any("get_method('gmix'" in b for b in blocks)
  for block in blocks:
    assert len([l for l in block.splitlines() if l.strip()]) <= 14, 'examples stay short'


def test_sam_transform_example_converges(capsys):
  scope = {}
  exec(next(b for b in _blocks() if 'transforms.sam' in b), scope)
  import numpy as np
  np.testing.assert_allclose(scope['w'], [1.0, -2.0, 0.5], atol=0.05)


def test_gmix_gradient_example_runs():
  scope = {}
  exec(next(b for b in _blocks() if "get_method('gmix'" in b), scope)
  assert set(scope['metrics']) == {'loss', 'perturbed_loss'}
  assert scope['grads']['w1'].shape == (4, 16)


def test_sam_transform_shard_map_example_is_per_device():
  """The shard_map example (8 fake devices) gives the mean of the one-device
  SAM updates of each device's rows (the per-device answer, not 8x it)."""
  import jax
  import numpy as np
  import optax
  from gmix_jax import transforms
  scope = {}
  exec(next(b for b in _blocks() if 'jax.shard_map' in b), scope)
  x, y, n = np.asarray(scope['x']), np.asarray(scope['y']), jax.device_count()
  opt = optax.chain(transforms.sam(rho=0.05), optax.sgd(0.1))
  news = []
  for xd, yd in zip(np.split(x, n), np.split(y, n)):
    grad_fn = lambda v, _=None: jax.grad(lambda v: ((xd @ v - yd) ** 2).mean())(v)
    w0 = np.zeros(3, np.float32)
    updates, _ = opt.update(grad_fn(w0), opt.init(w0), w0, grad_fn=grad_fn)
    news.append(optax.apply_updates(w0, updates))
  assert n == 8
  np.testing.assert_allclose(scope['w'], np.mean(news, 0), rtol=1e-5, atol=1e-6)
