"""The Python examples and commands of the README and of the docs/ pages
it links run and do what they say."""
import glob
import os
import re
import shlex
import warnings

from gmix_jax import cli, configure, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
# The README's long sections live in docs/*.md; their commands are checked the same way.
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))]


def _blocks():
  return re.findall(r'```python\n(.*?)```', _text(), re.S)


def test_readme_has_the_two_examples():
  blocks = _blocks()
  quick_start = _text([README]).split('## Quick start for library users', 1)[1].split('\n## ', 1)[0]
  assert 'transforms.sam' in quick_start     # the library user's example is in the README itself
  assert any("get_method('gmix'" in b for b in blocks)
  for block in re.findall(r'```python\n(.*?)```', _text([README]), re.S):
    assert len([l for l in block.splitlines() if l.strip()]) <= 14, 'README examples stay short'


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


def _text(pages=None):
  """The README and the docs pages, one after the other."""
  texts = []
  for page in pages or PAGES:
    with open(page) as f:
      texts.append(f.read())
  return '\n'.join(texts)


def test_readme_links_every_docs_page_and_the_pages_exist():
  """Each docs page is reachable from the README, and every relative link of
  the README and the pages names a file that exists."""
  readme = _text([README])
  for page in PAGES[1:]:
    assert f'docs/{os.path.basename(page)}' in readme, page
  for page in PAGES:
    for target, anchor in re.findall(r'\]\(([^)#:]*)(?:#([^)]*))?\)', _text([page])):
      path = os.path.join(os.path.dirname(page), target) if target else page
      assert os.path.exists(path), (page, target)
      if anchor and path.endswith('.md'):
        assert anchor in _anchors(path), (page, target, anchor)


def _anchors(path):
  """GitHub's heading anchors of a markdown file."""
  headings = re.findall(r'^#+ (.*)$', _text([path]), re.M)
  return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def test_readme_stays_short():
  """The README is a newcomer's page; long sections belong in docs/."""
  with open(README) as f:
    assert len(f.read().splitlines()) <= 300


def test_readme_opens_with_the_two_commands():
  """A newcomer's first screen: the demo and the tests, runnable on a fresh machine."""
  readme = _text([README])
  first_block = re.search(r'```bash\n(.*?)```', readme, re.S)
  assert first_block.start() < 800
  assert [l.split('#')[0].strip() for l in first_block.group(1).splitlines()] == [
      'make demo', 'make test']


def _cli_commands():
  """Every ``python -m gmix_jax.main ...`` command of the README and docs pages (bash blocks
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
  """The inline ``--config.FIELD=VALUE`` examples (README and docs pages) name
  real fields with valid values."""
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
