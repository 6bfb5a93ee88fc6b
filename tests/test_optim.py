"""The learning-rate schedules against their formulas, what the config refuses, and `lmjax schedule`."""

import math

import numpy as np
import pytest

from lmjax import cli, config as config_lib, optim

T, WARMUP, COOLDOWN, LR, MIN_LR = 60, 6, 20, 1.0, 0.1


def _oc(schedule, **kw):
  c = config_lib.default_config()
  o = c.optimizer
  o.schedule, o.warmup_steps, o.lr, o.min_lr, o.cooldown_steps = schedule, WARMUP, LR, MIN_LR, COOLDOWN
  for k, v in kw.items():
    o[k] = v
  return o


def _formula(schedule, step, shape='linear', cooldown=COOLDOWN):
  """The textbook curves, in float64, for a run of T steps."""
  if step < WARMUP:
    return LR * step / WARMUP
  if schedule == 'constant':
    return LR
  if schedule == 'inverse_sqrt':
    return LR * math.sqrt(WARMUP / step)
  if schedule in ('cosine', 'linear'):
    t = (step - WARMUP) / (T - WARMUP)
    left = 1 - t if schedule == 'linear' else 0.5 * (1 + math.cos(math.pi * t))
    return MIN_LR + (LR - MIN_LR) * left
  start = T - cooldown
  if step < start or not cooldown:
    return LR
  t = (step - start) / cooldown
  left = {'linear': 1 - t, 'cosine': 0.5 * (1 + math.cos(math.pi * t)), '1-sqrt': 1 - math.sqrt(t)}[shape]
  return MIN_LR + (LR - MIN_LR) * left


@pytest.mark.parametrize(
  'schedule,shape',
  [('cosine', ''), ('linear', ''), ('constant', ''), ('inverse_sqrt', '')]
  + [('wsd', s) for s in config_lib.COOLDOWN_SHAPES],
)
def test_every_schedule_follows_its_formula_at_every_step(schedule, shape):
  oc = _oc(schedule, cooldown_shape=shape or 'linear')
  lr = optim.schedule(oc, T)
  got = [float(lr(s)) for s in range(T)]
  np.testing.assert_allclose(got, [_formula(schedule, s, shape or 'linear') for s in range(T)], rtol=1e-6, atol=1e-7)


def test_the_stable_phase_of_wsd_is_exactly_lr_whatever_the_cooldown_and_the_run_length():
  # What branching rests on: the stable run (no cooldown, any length) and each branch (cooldown at its own end)
  # take bitwise the same learning rate at every step before the branch's cooldown begins.
  stable = optim.schedule(_oc('wsd', cooldown_steps=0), 1000)
  for cooldown, steps in ((10, 40), (20, 60), (30, 90)):
    branch = optim.schedule(_oc('wsd', cooldown_steps=cooldown), steps)
    for s in range(steps - cooldown):
      assert np.float32(branch(s)).tobytes() == np.float32(stable(s)).tobytes(), (cooldown, s)
    assert float(branch(steps - 1)) < LR


@pytest.mark.parametrize(
  'override,fragment',
  [
    ('optimizer.schedule=step', 'optimizer.schedule must be one of cosine, linear'),
    ('optimizer.cooldown_shape=exp', 'optimizer.cooldown_shape must be one of linear, cosine, 1-sqrt'),
    ('optimizer.cooldown_steps=-1', 'optimizer.cooldown_steps (-1) must be >= 0'),
  ],
)
def test_a_bad_schedule_setting_is_a_config_error_naming_it(override, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
    config_lib.load('configs/tiny.py', [override])


def test_a_wsd_cooldown_longer_than_the_run_is_refused_in_one_line(capsys):
  argv = ['schedule', '--config=configs/tiny.py', '--config.optimizer.schedule=wsd']
  assert cli.main(argv + ['--config.optimizer.cooldown_steps=55']) == 2  # + 10 warmup steps > 60
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax schedule: error: optimizer.cooldown_steps (55)') and 'fit in the 60 steps' in line


def test_lmjax_schedule_prints_the_curve_at_the_phase_boundaries_and_plots_it(tmp_path, capsys):
  argv = ['schedule', '--config=configs/tiny.py', '--config.optimizer.schedule=wsd', '--points=3']
  png = tmp_path / 'lr.png'
  assert cli.main(argv + ['--config.optimizer.cooldown_steps=20', f'--png={png}']) == 0
  printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith('step ')]
  # steps 0, 30 and 59 evenly, 10 (end of warmup) and 40 (start of the cooldown)
  assert [int(p[1]) for p in printed] == [0, 10, 30, 40, 59]
  assert [float(p[3]) for p in printed[:4]] == [0.0, 3e-3, 3e-3, 3e-3] and 3e-4 < float(printed[4][3]) < 3e-3
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
