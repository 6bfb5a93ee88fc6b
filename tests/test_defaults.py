"""With every recipe field at its default (schedule, z-loss, QK-norm, soft-caps, EMA, branches, per-group
multipliers), a run is bitwise the run lmjax made before they existed.

The reference, tests/golden/defaults.json, was recorded by this file's `record` with the code before those fields
(commit cd9d8bd): every logged metric of two short tiny runs and a SHA-256 of the whole final train state (step,
parameters, optimizer state) as the checkpoint restores it. XLA may change its CPU numerics between JAX versions:
after an upgrade, re-record it with the code of cd9d8bd (`python tests/test_defaults.py record`), never with new code.
"""

import hashlib
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from conftest import ONE_DEVICE, rows, train_tiny

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'defaults.json'
# Twenty steps of the GPT-2 and the Llama variants, with a checkpoint and an eval at 10 and 20.
RUNS = {
  'gpt2': ('train.steps=20', 'train.eval_every=10', 'train.checkpoint_every=10', 'train.log_every=5'),
  'llama': ('train.steps=20', 'train.eval_every=10', 'train.checkpoint_every=10', 'train.log_every=5'),
}


def _run(name, workdir, dirs):
  from lmjax import config as config_lib, inference, train  # pylint: disable=import-outside-toplevel

  config_file = 'configs/tiny.py:llama' if name == 'llama' else 'configs/tiny.py'
  from conftest import tiny_overrides  # pylint: disable=import-outside-toplevel

  overrides = tiny_overrides(*dirs) + ONE_DEVICE + list(RUNS[name])
  with jax.default_device(jax.devices()[0]):
    train.train(config_lib.load(config_file, overrides), str(workdir))
  metrics = [
    {k: v for k, v in r.items() if k not in ('tokens_per_sec', 'mfu', 'ms_per_step', 'time')} for r in rows(workdir)
  ]
  _, _, _, state = inference.load_run(str(workdir), ONE_DEVICE, params_only=False)
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return {'metrics': metrics, 'state_sha256': digest.hexdigest()}


@pytest.mark.parametrize('name', sorted(RUNS))
def test_a_run_with_every_recipe_field_at_its_default_is_bitwise_the_recorded_run(name, tmp_path, shakespeare_dirs):
  want = json.loads(GOLDEN.read_text())[name]
  got = _run(name, tmp_path / name, shakespeare_dirs)
  assert got['metrics'] == want['metrics']
  assert got['state_sha256'] == want['state_sha256']


def record(out_dir):
  """Writes the golden file from the code checked out now (see the module docstring for when)."""
  from conftest import SHARED_DATA  # pylint: disable=import-outside-toplevel
  from lmjax import sources  # pylint: disable=import-outside-toplevel

  data_dir = pathlib.Path(out_dir) / 'tfds'
  sources.prepare_tiny_shakespeare(str(data_dir), str(SHARED_DATA))
  dirs = (str(SHARED_DATA), str(data_dir))
  GOLDEN.write_text(json.dumps({n: _run(n, pathlib.Path(out_dir) / n, dirs) for n in sorted(RUNS)}, indent=1) + '\n')


if __name__ == '__main__' and sys.argv[1:] == ['record']:
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    record(tmp)
