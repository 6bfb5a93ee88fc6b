"""Using a trained run: no training checks (a run trained on 1 device samples and evaluates on 8), parameters
only, and the checkpoint asked for."""

import json

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE

from lmjax import cli, errors, inference

# What a 1-device run recorded looks like on an 8-device host: the mesh takes every device, and the batch of 12
# rows that training used does not split over 8 (training refuses it; inference must not).
ON_EIGHT = ['mesh.data=-1', 'train.batch_size=12', 'train.eval_batch_size=12']
WHOLE_SPLIT = ['train.eval_max_batches=0']  # batches of any size then cover the same rows


def test_a_one_device_run_evaluates_on_eight_devices_to_the_same_loss(trained):
  assert jax.device_count() == 8
  _, _, engine, state = inference.load_run(trained, ON_EIGHT)
  assert engine.mesh.size == 8 and state.opt_state is None  # parameters only: no optimizer moments read
  on_eight = inference.evaluate_run(trained, ON_EIGHT + WHOLE_SPLIT)  # 12 rows a batch, rounded up to 16 on 8
  on_one = inference.evaluate_run(trained, ONE_DEVICE + WHOLE_SPLIT)
  assert on_eight['step'] == on_one['step'] == 60
  assert on_eight['val_loss'] == pytest.approx(on_one['val_loss'], rel=1e-5)


def test_a_one_device_run_samples_on_eight_devices(trained, capsys):
  argv = [
    'sample',
    f'--workdir={trained}',
    '--prompt=ROMEO:',
    '--max_new_tokens=8',
    '--num_samples=3',
    '--greedy',
    '--format=jsonl',
    *(f'--config.{o}' for o in ON_EIGHT),
  ]
  assert cli.main(argv) == 0
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith('{')]
  assert [r['sample'] for r in rows] == [0, 1, 2]
  assert rows[0]['text'] and all(r['text'] == rows[0]['text'] for r in rows)  # greedy: the same text each time


def test_a_step_that_was_not_saved_is_a_clear_error(trained):
  with pytest.raises(errors.CheckpointError, match=r'No checkpoint for step 45.*\[30, 60\]'):
    inference.load_run(trained, ONE_DEVICE, step=45)
  with pytest.raises(errors.CheckpointError, match=r'best \(train.keep_best\) holds no checkpoint'):
    inference.load_run(trained, ONE_DEVICE, step='best')


def test_an_earlier_step_restores_that_step(trained):
  _, _, _, state = inference.load_run(trained, ONE_DEVICE, step=30)
  _, _, _, last = inference.load_run(trained, ONE_DEVICE)
  assert int(state.step) == 30 and int(last.step) == 60
  a, b = jax.tree.leaves(state.params)[0], jax.tree.leaves(last.params)[0]
  assert not np.array_equal(np.asarray(a), np.asarray(b))
