"""Faults injected into real runs of the CLI: kill -9 at seeded random moments, SIGTERM during start-up, and
damaged checkpoints of each kind. After each, running the same command again finishes the run, and what it
leaves equals the uninterrupted run bitwise: parameters, optimizer state, and metrics rows. (Elsewhere: a full
disk and a damaged newest step in test_cli/test_checkpoint, two trains on one workdir in test_workdir, NaN with
both policies in test_steps, SIGTERM mid-run in test_train.)"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE, REPO, rows, tiny_overrides, tiny_train_command, train_tiny

from lmjax import inference

SEED = 20261201
_rng = random.Random(SEED)
# (clock, seconds): 'row' counts from the first metrics row (mid-run), 'save' from the moment an async checkpoint
# write is seen under its temporary name (a checkpoint every 10 steps), 'spawn' from the start of the process
# (imports, compile, restore).
MOMENTS = (
  [('row', round(_rng.uniform(0.0, 1.0), 3)) for _ in range(4)]
  + [('save', round(_rng.uniform(0.0, 0.01), 4)) for _ in range(3)]
  + [('spawn', round(_rng.uniform(0.5, 4.0), 3)) for _ in range(3)]
)
EXTRA = ['train.checkpoint_every=10', 'train.keep_checkpoints=2']


def _command(wd, dirs, cache_dir):
  return tiny_train_command(
    wd, tiny_overrides(*dirs) + ONE_DEVICE + EXTRA + [f'train.compilation_cache_dir={cache_dir}']
  )


def _has_rows(wd):
  path = os.path.join(wd, 'metrics.jsonl')
  return os.path.exists(path) and os.path.getsize(path) > 0


def _saving(wd):
  """An async checkpoint write in flight: Orbax writes a step under a temporary name, renamed when complete."""
  try:
    return any('tmp' in name for name in os.listdir(os.path.join(wd, 'checkpoints')))
  except OSError:
    return False


def _assert_equals_the_uninterrupted_run(wd, trained, extra_rows_at=()):
  _, _, _, want = inference.load_run(trained, ONE_DEVICE, params_only=False)
  _, _, _, got = inference.load_run(str(wd), ONE_DEVICE, params_only=False)
  assert int(got.step) == 60
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  skip = ('time', 'tokens_per_sec', 'mfu', 'ms_per_step')
  strip = lambda d: [{k: v for k, v in r.items() if k not in skip} for r in rows(d)]
  assert [r for r in strip(wd) if r['step'] not in extra_rows_at] == strip(trained)


@pytest.mark.parametrize('clock, delay', MOMENTS, ids=[f'{c}+{d}s' for c, d in MOMENTS])
def test_kill_9_at_a_random_moment_then_the_same_command_equals_the_uninterrupted_run(
  clock, delay, tmp_path, trained, shakespeare_dirs, cache_dir
):
  wd = tmp_path / 'run'
  proc = subprocess.Popen(
    _command(wd, shakespeare_dirs, cache_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.time() + 240
    while clock == 'row' and not _has_rows(wd) and proc.poll() is None:
      assert time.time() < deadline, 'training did not start'
      time.sleep(0.02)
    while clock == 'save' and not _saving(wd) and proc.poll() is None:
      assert time.time() < deadline, 'no checkpoint write was seen'
      time.sleep(0.001)
    time.sleep(delay)
    phase = 'finished' if proc.poll() is not None else ('training' if _has_rows(wd) else 'start-up')
    proc.send_signal(signal.SIGKILL)
    if _saving(wd):
      phase += ', during a save'
  finally:
    proc.wait(timeout=60)
  print(f'kill -9 at {clock}+{delay}s landed in {phase}')
  train_tiny(wd, shakespeare_dirs, *EXTRA, cache=cache_dir)  # the same run again, on the same workdir
  _assert_equals_the_uninterrupted_run(wd, trained)


def test_sigterm_during_start_up_stops_at_the_first_step_and_the_rerun_finishes(
  tmp_path, trained, shakespeare_dirs, cache_dir
):
  wd = tmp_path / 'run'
  proc = subprocess.Popen(
    _command(wd, shakespeare_dirs, cache_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  while not (wd / 'lock.json').exists() and proc.poll() is None:  # the run has begun: imports done, lock taken
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 143 and 'SIGTERM: saved a checkpoint at step 1' in out, out[-3000:]
  assert not (wd / 'lock.json').exists()
  train_tiny(wd, shakespeare_dirs, *EXTRA, cache=cache_dir)
  _assert_equals_the_uninterrupted_run(wd, trained, extra_rows_at=(1,))  # the stopped run logged its step 1


@pytest.mark.parametrize('damage', ['zero-filled', 'truncated', 'no state item', 'no meta item'])
def test_each_kind_of_damaged_latest_step_is_set_aside_and_the_rerun_equals_the_uninterrupted_run(
  damage, tmp_path, trained, shakespeare_dirs, cache_dir
):
  wd = tmp_path / 'run'
  shutil.copytree(trained, wd)
  step_dir = wd / 'checkpoints' / '60'
  for root, _, files in os.walk(step_dir / 'state'):
    for name in files:
      path = os.path.join(root, name)
      if damage == 'zero-filled':
        with open(path, 'r+b') as f:
          f.write(b'\0' * os.path.getsize(path))
      elif damage == 'truncated':
        os.truncate(path, os.path.getsize(path) // 2)
  if damage == 'no state item':
    shutil.rmtree(step_dir / 'state')
  if damage == 'no meta item':
    shutil.rmtree(step_dir / 'meta')
  # The finished run's last step is damaged: the rerun restores 30 and trains 30 -> 60 again.
  train_tiny(wd, shakespeare_dirs, cache=cache_dir)
  assert (wd / 'checkpoints' / 'damaged' / '60').is_dir()
  _assert_equals_the_uninterrupted_run(wd, trained)


_SIGTERM_IN_FINAL_WAIT = """
import os, signal, sys
from lmjax import checkpoint, config, train
real_wait, sent = checkpoint.Checkpointer.wait, []

def wait_after_a_sigterm(self):  # the loop's last call: the final checkpoint is still being written
  if not sent:
    sent.append(True)
    os.kill(os.getpid(), signal.SIGTERM)  # without lmjax's handler here, this process would end now
  return real_wait(self)

checkpoint.Checkpointer.wait = wait_after_a_sigterm
train.train(config.load('configs/tiny.py', sys.argv[2:]), sys.argv[1])
print('FINISHED', bool(sent))
"""


def test_sigterm_during_the_final_checkpoint_write_waits_for_it(tmp_path, trained, shakespeare_dirs, cache_dir):
  # In a process of its own: a signal to the test process itself could end a test worker.
  wd = tmp_path / 'run'
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + [f'train.compilation_cache_dir={cache_dir}']
  proc = subprocess.run(
    [sys.executable, '-c', _SIGTERM_IN_FINAL_WAIT, str(wd), *overrides],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and 'FINISHED True' in proc.stdout, proc.stderr[-3000:]  # the run was done: exit 0
  _assert_equals_the_uninterrupted_run(wd, trained)


def _in_a_small_filesystem(script: str, size: str):
  """Runs bash `script` with $SMALL a fresh tmpfs of `size`, in a mount namespace of its own (unshare -rm: root
  inside, no mount left behind); skips where the machine allows no such mount."""
  probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'], capture_output=True, check=False)
  if probe.returncode:
    pytest.skip(f'this machine allows no private tmpfs mount (unshare -rm: {probe.stderr.decode().strip()[:120]})')
  small = f'/tmp/lmjax-small-{os.getpid()}'
  os.makedirs(small, exist_ok=True)
  wrapped = f'mount -t tmpfs -o size={size} tmpfs {small} && export SMALL={small} && {script}'
  env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
  try:
    return subprocess.run(
      ['unshare', '-rm', 'bash', '-c', wrapped],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=600,
      check=False,
    )
  finally:
    os.rmdir(small)


def test_a_really_full_disk_during_an_async_save_is_one_line_and_keeps_the_earlier_steps(shakespeare_dirs):
  # Found by trying it: a real full disk (not an injected ENOSPC) surfaced as Orbax's RESOURCE_EXHAUSTED traceback
  # from its background threads, and (on a loaded host, one run in three) as 'Event loop is closed' tracebacks from
  # its writes still in flight; a save the disk cannot hold is now refused before it starts. A tiny run's checkpoint
  # takes ~0.5 MB of tmpfs: 1.5 MB holds two, and the third is refused.
  overrides = (
    tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + ['train.checkpoint_every=5', 'train.keep_checkpoints=100']
  )
  train = ' '.join(f"'{a}'" for a in tiny_train_command('$SMALL/run', overrides)).replace(
    "'--workdir=$SMALL/run'", '"--workdir=$SMALL/run"'
  )
  evaluate = f'{sys.executable} -m lmjax eval "--workdir=$SMALL/run" --step=10 ' + ' '.join(
    f"'--config.{o}'" for o in ONE_DEVICE
  )
  out = _in_a_small_filesystem(f'{train}; echo "train exit $?" >&2; ls "$SMALL/run/checkpoints"; {evaluate}', '1500k')
  errors = [l for l in out.stderr.splitlines() if 'Traceback' in l or l.startswith(('ERROR', 'lmjax train:'))]
  assert 'train exit 2' in out.stderr, out.stderr[-3000:]
  assert len(errors) == 1, out.stderr[-4000:]  # the one line, and no traceback or logged error beside it
  assert 'TPU_WORKER_HOSTNAMES' not in out.stderr, out.stderr[:2000]  # nor libtpu's start-up errors (the tpu extra)
  [line] = errors
  assert line.startswith('lmjax train: error: saving the checkpoint of step') and 'the disk is full' in line, line
  listed = out.stdout.split()
  assert '5' in listed and '10' in listed, out.stdout
  evaluated = json.loads(out.stdout.strip().splitlines()[-1])
  assert evaluated['step'] == 10 and np.isfinite(evaluated['val_loss'])
