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
