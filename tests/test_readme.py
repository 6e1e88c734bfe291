"""The README's Python examples run and do what they say."""
import os
import re
import shlex
import warnings

from gmix_jax import cli, configure, main

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


def _text():
  with open(README) as f:
    return f.read()


def _cli_commands():
  """Every ``python -m gmix_jax.main ...`` command of the README (bash blocks
  with their line continuations, and inline code), as argument lists."""
  text = _text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      if 'python -m gmix_jax.main' in line:
        commands.append(line.split('#')[0])
  commands += re.findall(r'`(python -m gmix_jax\.main [^`]*)`', text)
  # Placeholders such as <fresh dir> stand for one word.
  return [shlex.split(re.sub(r'<[^>]*>', 'PLACEHOLDER', c))[3:] for c in commands]


def test_readme_cli_commands_parse_and_validate(capsys, tmp_path):
  """Each command runs up to the training itself: --help ones completely, the
  others through the command line, the config file and ``validate_config``
  (training them is the demo's and the configs' job)."""
  commands = _cli_commands()
  assert len(commands) >= 7
  for argv in commands:
    if '--help' in argv:
      assert main.main(argv) == 0, argv
      continue
    args = cli.parse_argv(argv)
    assert args.config_spec and args.workdir, argv
    config, _ = cli.load(args.config_spec, args.overrides)
    configure.validate_config(config)
  capsys.readouterr()


def test_readme_override_fragments_apply_to_the_default_config():
  """The inline ``--config.FIELD=VALUE`` examples name real fields with valid values."""
  fragments = [f for f in re.findall(r'`(--config\.[^`]*)`', _text())
               if re.search(r'=\S', f) and not re.search(r'FIELD|KEY|=[A-Z_]+(\s|$)', f)]
  assert len(fragments) >= 8
  for fragment in fragments:
    args = cli.parse_argv(['--config=configs/default.py', '--workdir=unused', *shlex.split(fragment)])
    config, _ = cli.load(args.config_spec, args.overrides)
    with warnings.catch_warnings():   # e.g. default.py's sensitivity.chunk under method.name=erm
      warnings.simplefilter('ignore', configure.IgnoredKnobWarning)
      configure.validate_config(config)


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
