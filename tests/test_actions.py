"""The loop's periodic actions: registered actions run at their interval, keep-best keeps the best step by its
metric while the last K rotate, and time-based checkpoints follow the clock."""

import math
import os

import pytest
from conftest import ONE_DEVICE, rows, train_tiny

from lmjax import actions, checkpoint, inference, workdir as workdir_lib


def _steps(directory):
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


class Recorder(actions.Action):
  name = 'recorder'

  def __init__(self, every):
    super().__init__(every=every, at_last_step=False)
    self.seen = []

  def run(self, loop):
    self.seen.append((loop.step, int(loop.state.step), 'train_loss' in loop.metrics))
    return {'recorded': float(len(self.seen))}


def test_a_registered_action_runs_at_its_interval_and_its_metrics_are_logged(tmp_path, shakespeare_dirs, cache_dir):
  recorder = Recorder(every=20)
  factory = actions.register(lambda config: recorder)
  try:
    train_tiny(tmp_path / 'run', shakespeare_dirs, cache=cache_dir)
  finally:
    actions.unregister(factory)
  assert recorder.seen == [(20, 20, True), (40, 40, True), (60, 60, True)]  # loop step = state step, loss read
  assert [(r['step'], r['recorded']) for r in rows(tmp_path / 'run') if 'recorded' in r] == [
    (20, 1.0),
    (40, 2.0),
    (60, 3.0),
  ]


class Scripted(actions.Action):
  """A metric with a known best step: 20, then 50 comes close but is worse."""

  name = 'scripted'
  VALUES = {10: 3.0, 20: 1.0, 30: 2.0, 40: 5.0, 50: 1.5, 60: 4.0}

  def run(self, loop):
    return {'scripted_loss': self.VALUES[loop.step]}


def test_keep_best_keeps_the_best_step_by_its_metric_while_the_last_k_rotate(tmp_path, shakespeare_dirs, cache_dir):
  wd = str(tmp_path / 'run')
  best = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(wd, best=True), max_to_keep=1)
  try:
    train_tiny(
      wd,
      shakespeare_dirs,
      'train.checkpoint_every=10',
      'train.keep_checkpoints=2',
      'train.eval_every=0',
      cache=cache_dir,
      actions=[Scripted(every=10), actions.KeepBest('scripted_loss', best, every=10)],
    )
  finally:
    best.wait()
    best.close()
  assert _steps(workdir_lib.checkpoint_dir(wd)) == [50, 60]
  assert _steps(workdir_lib.checkpoint_dir(wd, best=True)) == [20]
  _, _, _, state = inference.load_run(wd, ONE_DEVICE, step='best')
  assert int(state.step) == 20
  logged = [(r['step'], r['best_scripted_loss']) for r in rows(wd) if 'best_scripted_loss' in r]
  assert logged == [(10, 3.0), (20, 1.0)]  # logged when it improves, never otherwise


def test_keep_best_by_val_loss_from_the_config_and_eval_of_the_best(tmp_path, shakespeare_dirs, cache_dir):
  wd = str(tmp_path / 'run')
  train_tiny(
    wd, shakespeare_dirs, 'train.keep_best=val_loss', 'train.eval_every=20', 'train.keep_checkpoints=1', cache=cache_dir
  )
  evals = {r['step']: r['val_loss'] for r in rows(wd) if 'val_loss' in r}
  best_step = min(evals, key=evals.get)
  assert _steps(workdir_lib.checkpoint_dir(wd, best=True)) == [best_step]
  assert _steps(workdir_lib.checkpoint_dir(wd)) == [60]
  result = inference.evaluate_run(wd, ONE_DEVICE, step='best')
  assert result['step'] == best_step and result['val_loss'] == pytest.approx(evals[best_step], rel=1e-6)
  # A resumed run knows the best value so far: it keeps the old best unless a new evaluation beats it.
  kept = actions.KeepBest('val_loss', checkpoint.Checkpointer(workdir_lib.checkpoint_dir(wd, best=True)))
  assert kept.best == pytest.approx(evals[best_step]) and math.isfinite(kept.best)
  kept.checkpointer.close()


class FakeClock:
  """A quarter of a minute passes per call of the train step."""

  def __init__(self):
    self.calls = 0

  def minutes(self):
    self.calls += 1
    return self.calls / 4


def test_time_based_checkpoints_follow_the_clock(tmp_path, shakespeare_dirs, cache_dir):
  wd = str(tmp_path / 'run')
  train_tiny(
    wd,
    shakespeare_dirs,
    'train.checkpoint_minutes=1.0',
    'train.checkpoint_every=0',
    'train.eval_every=0',
    'train.keep_checkpoints=100',
    cache=cache_dir,
    clock=FakeClock(),
  )
  assert _steps(workdir_lib.checkpoint_dir(wd)) == list(range(4, 61, 4)) + [60] * (60 % 4 != 0)
