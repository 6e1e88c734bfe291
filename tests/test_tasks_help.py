"""--help of a SAMix config shows the values its knobs run with (the task's
SAMix config reaches the help page)."""
from configs import digits
from gmix_jax import cli


def test_samix_help_resolves_its_knobs():
  defaults = cli.method_defaults(digits.get_config('samix'))
  assert defaults['method.samix.alpha'][1] and defaults['method.samix.alpha'][0] is not None
  assert 'method.mixing.policy' in defaults and not defaults['method.mixing.policy'][1]
