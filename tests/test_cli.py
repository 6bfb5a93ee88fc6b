"""The command line: a table of commands, help without importing JAX, and every user-fixable failure as one line
`lmjax CMD: error: ...` with exit code 2 (never a traceback, never an abort after it)."""

import os
import subprocess
import sys

import pytest
from conftest import ONE_DEVICE, REPO, tiny_overrides

from lmjax import checkpoint, cli


def lmjax(*args, timeout=300):
  return subprocess.run(
    [sys.executable, '-m', 'lmjax', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


def assert_one_line_error(proc, command, *fragments):
  err = proc.stderr
  assert proc.returncode == 2, (proc.returncode, err[-3000:])
  assert 'Traceback' not in err and 'terminate called' not in err, err[-3000:]
  [line] = [l for l in err.splitlines() if l.startswith(f'lmjax {command}: error: ')]
  for f in fragments:
    assert f in line, (f, line)
  return line


def test_help_lists_every_command_and_imports_no_jax():
  code = (
    'import sys\nfrom lmjax import cli\n'
    'for argv in (["--help"], *([name, "--help"] for name in cli.COMMANDS)):\n'
    '  try:\n    cli.main(argv)\n  except SystemExit as e:\n    assert e.code == 0, argv\n'
    'heavy = [m for m in ("jax", "flax", "optax", "orbax", "grain", "tensorflow_datasets") if m in sys.modules]\n'
    'assert not heavy, heavy\n'
  )
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  for name, command in cli.COMMANDS.items():
    assert name in proc.stdout and command.help.split()[0] in proc.stdout


@pytest.fixture(scope='module')
def broken_config(tmp_path_factory):
  path = tmp_path_factory.mktemp('cfg') / 'broken.py'
  path.write_text('from lmjax.config import default_config\n\ndef get_config(:\n  return default_config()\n')
  return str(path)


@pytest.mark.parametrize('case', ['syntax', 'variant', 'heads', 'kv_heads', 'optimizer', 'several'])
def test_a_bad_config_is_one_line_with_exit_2_before_anything_runs(case, broken_config, tmp_path):
  config, overrides, fragments = {
    'syntax': (broken_config, [], ['broken.py line 3']),
    'variant': ('configs/tiny.py:nope', [], ["has variants '' and 'llama', not 'nope'"]),
    'heads': (
      'configs/tiny.py',
      ['--config.model.d_model=30'],
      ['model.d_model (30) must be divisible by n_heads (4)'],
    ),
    'kv_heads': ('configs/tiny.py', ['--config.model.n_kv_heads=3'], ['model.n_kv_heads (3) must divide n_heads (4)']),
    'optimizer': ('configs/tiny.py', ['--config.optimizer.name=sgd'], ['optimizer.name must be one of adamw', "'sgd'"]),
    'several': (
      'configs/tiny.py',
      ['--config.model.d_model=30', '--config.optimizer.name=sgd', '--config.train.steps=0'],
      ['d_model (30)', "got 'sgd'", 'train.steps (0) must be > 0'],
    ),
  }[case]
  proc = lmjax('train', f'--config={config}', f'--workdir={tmp_path / "run"}', *overrides)
  assert_one_line_error(proc, 'train', *fragments)
  assert not (tmp_path / 'run').exists()  # refused before the workdir was touched


@pytest.mark.parametrize('case', ['file', 'unwritable'])
def test_a_workdir_that_cannot_be_written_is_one_line_with_exit_2(case, tmp_path, shakespeare_dirs):
  if case == 'file':
    workdir = tmp_path / 'a_file'
    workdir.write_text('not a directory')
    fragment = 'is a file, not a directory'
  else:
    workdir = '/proc/lmjax_cannot_write_here'  # a filesystem no one may create files in, root included
    fragment = 'cannot write to --workdir'
  overrides = [f'--config.{o}' for o in tiny_overrides(*shakespeare_dirs) + ONE_DEVICE]
  proc = lmjax('train', '--config=configs/tiny.py', f'--workdir={workdir}', *overrides)
  assert_one_line_error(proc, 'train', fragment)


@pytest.mark.parametrize(
  'change, fragment',
  [
    ('model.d_model=64', 'model.d_model: checkpoint 32 vs run 64'),
    ('model.vocab_size=80', 'model.vocab_size: checkpoint 65 vs run 80'),
  ],
)
def test_a_refused_resume_exits_2_and_never_aborts_afterwards(change, fragment, trained, shakespeare_dirs, cache_dir):
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + [f'train.compilation_cache_dir={cache_dir}', change]
  proc = lmjax('train', '--config=configs/tiny.py', f'--workdir={trained}', *(f'--config.{o}' for o in overrides))
  assert_one_line_error(proc, 'train', fragment)


def test_a_full_disk_during_a_save_is_one_line_saying_where(tmp_path, shakespeare_dirs, monkeypatch, capsys):
  real_save = checkpoint.ocp.CheckpointManager.save

  def full_disk(self, step, *a, **k):
    if step >= 2:  # the first save works: a disk that fills during the run
      raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "d/ocdbt.process_0/d/1f2e": '
        '[OS error 28: No space left on device] in OCDBT database'
      )
    return real_save(self, step, *a, **k)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', full_disk)
  overrides = (
    tiny_overrides(
      *shakespeare_dirs, **{'train.steps': 2, 'train.checkpoint_every': 1, 'train.eval_every': 0, 'train.log_every': 1}
    )
    + ONE_DEVICE
  )
  code = cli.main(
    ['train', '--config=configs/tiny.py', f'--workdir={tmp_path / "run"}', *(f'--config.{o}' for o in overrides)]
  )
  err = capsys.readouterr().err
  assert code == 2, err
  [line] = [l for l in err.splitlines() if l.startswith('lmjax train: error: ')]
  assert 'step 2' in line and str(tmp_path / 'run' / 'checkpoints') in line and 'the disk is full' in line
  assert sorted(s for s in os.listdir(tmp_path / 'run' / 'checkpoints') if s.isdigit()) == ['1']  # nothing lost


def _zero_fill(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:  # zero-filled, as after a crash on a filesystem without ordered writes
        f.write(b'\0' * os.path.getsize(path))


def test_eval_when_no_checkpoint_restores_is_one_line_naming_each_step(trained, tmp_path, capsys):
  import shutil  # pylint: disable=import-outside-toplevel

  copy = tmp_path / 'run'
  shutil.copytree(trained, copy)
  _zero_fill(copy / 'checkpoints' / '60' / 'state')
  shutil.rmtree(copy / 'checkpoints' / '30' / 'state')  # a missing item
  code = cli.main(['eval', f'--workdir={copy}', '--config.mesh.data=1'])
  err = capsys.readouterr().err
  assert code == 2, err
  [line] = [l for l in err.splitlines() if l.startswith('lmjax eval: error: ')]
  assert 'no checkpoint in' in line and 'step 60:' in line and 'step 30:' in line and str(copy) in line
  assert sorted(os.listdir(copy / 'checkpoints')) == ['30', '60']  # eval only reads: nothing moved
