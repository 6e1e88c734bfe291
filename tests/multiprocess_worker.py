"""One process of a multi-process CPU training run (tests/test_reliability.py).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR

Each process gets 2 fake CPU devices and joins the others through
``JAX_COORDINATOR_ADDRESS`` (read by ``parallel.maybe_initialize_distributed``
inside ``train_and_evaluate``); cross-process collectives on CPU go through
gloo (JAX's default CPU collectives). Every process trains the tiny digits
config on its slice of each global batch; process 0 writes the summary to
``WORKDIR/worker_summary.json``. The final state is read from the checkpoint.
"""
import json
import os
import sys

process_id, num_processes, port, workdir, data_dir = sys.argv[1:6]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['JAX_COORDINATOR_ADDRESS'] = f'localhost:{port}'
os.environ['JAX_NUM_PROCESSES'] = num_processes
os.environ['JAX_PROCESS_ID'] = process_id
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(here), here]

import jax  # noqa: E402

from gmix_jax import train  # noqa: E402
from test_reliability import multiprocess_config  # noqa: E402

summary = train.train_and_evaluate(multiprocess_config(data_dir), workdir)
assert jax.process_count() == int(num_processes) and jax.device_count() == 2 * int(num_processes)
if jax.process_index() == 0:
  with open(os.path.join(workdir, 'worker_summary.json'), 'w') as f:
    json.dump(summary, f)
print(f'process {process_id}: done, {summary["steps"]} steps', flush=True)
