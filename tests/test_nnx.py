"""The Optax sharpness transforms under Flax NNX (docs/nnx.md)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip('flax.nnx')

from gmix_jax import transforms  # noqa: E402

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'nnx.md')


def _doc_example() -> str:
  with open(DOC) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert len(blocks) == 1
  return blocks[0]


def test_doc_example_runs_and_trains():
  scope = {}
  exec(compile(_doc_example(), DOC, 'exec'), scope)     # asserts the loss falls
  assert scope['losses'][-1] < scope['losses'][0]


class _BNNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 5, rngs=rngs)
    self.norm = nnx.BatchNorm(5, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.norm(self.hidden(x))))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_one_nnx_step_equals_a_hand_written_sam_step(x64):
  rho, lr = 0.3, 0.1
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)))
  y = jnp.asarray([0, 1, 1, 0, 1, 0, 0, 1])
  model = _BNNet(nnx.Rngs(0))
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  p0, r0 = nnx.as_pure(params0), nnx.as_pure(rest0)

  # By hand: both passes in train mode on copies; ε = ρ g/‖g‖; w ← w − lr ∇L(w + ε).
  f = lambda p: _loss(nnx.merge(graphdef, p, r0), x, y)
  g = jax.grad(f)(p0)
  norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
  gp = jax.grad(f)(jax.tree.map(lambda w, gi: w + rho * gi / norm, p0, g))
  want = jax.tree.map(lambda w, d: w - lr * d, p0, gp)
  first = nnx.merge(graphdef, p0, r0)
  first(x)                                   # the running statistics of the first pass only
  want_mean = nnx.as_pure(nnx.state(first, nnx.BatchStat))

  optimizer = nnx.Optimizer(model, optax.chain(transforms.sam(rho), optax.sgd(lr)), wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  grads = nnx.grad(_loss)(model, x, y)

  def grad_fn(p, _):
    return jax.grad(lambda q: _loss(nnx.merge(graphdef, q, nnx.as_pure(rest)), x, y))(p)
  optimizer.update(model, grads, grad_fn=grad_fn)

  got = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  for a, b in zip(jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.BatchStat))),
                  jax.tree.leaves(want_mean)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_grad_fn_returning_nnx_state_gets_a_clear_error():
  x = jnp.ones((4, 3))
  y = jnp.asarray([0, 1, 1, 0])
  model = _BNNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(transforms.sam(0.05), optax.sgd(0.1)),
                            wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  grads = nnx.grad(_loss)(model, x, y)

  def wrong_grad_fn(p, _):          # nnx.grad's State, not arrays shaped like p
    return nnx.grad(_loss)(nnx.merge(graphdef, p, rest), x, y)
  with pytest.raises(ValueError, match='pytree structure differs.*docs/nnx.md'):
    optimizer.update(model, grads, grad_fn=wrong_grad_fn)
