"""What a workdir holds: references, writability, and the provenance of every start."""

import json
import os
import socket
import subprocess
import time

import jax
import pytest
from conftest import ONE_DEVICE, REPO, tiny_overrides, tiny_train_command, train_tiny

from lmjax import cli, errors, workdir


@pytest.mark.parametrize(
  'ref, want',
  [
    ('runs/a', ('runs/a', None)),
    ('runs/a:30', ('runs/a', 30)),
    ('runs/a:best', ('runs/a', 'best')),
    ('gs://b/runs/a', ('gs://b/runs/a', None)),
    ('gs://b/runs/a:7', ('gs://b/runs/a', 7)),
  ],
)
def test_a_reference_is_a_directory_and_an_optional_step(ref, want):
  assert workdir.split_ref(ref) == want


def test_a_file_in_place_of_the_workdir_is_refused(tmp_path):
  (tmp_path / 'f').write_text('x')
  with pytest.raises(errors.WorkdirError, match='is a file'):
    workdir.ensure_writable(str(tmp_path / 'f'))
  assert workdir.ensure_writable(str(tmp_path / 'new' / 'run')) and (tmp_path / 'new' / 'run').is_dir()
  assert os.listdir(tmp_path / 'new' / 'run') == []  # the write probe leaves nothing behind


def test_provenance_records_code_command_versions_devices_and_host(trained):
  [entry] = workdir.read_provenance(trained)
  assert entry['git_commit'] == workdir.git_state()['commit'] and isinstance(entry['git_dirty'], bool)
  assert entry['versions']['jax'] == jax.__version__ and entry['versions']['flax']
  assert entry['device_count'] == jax.device_count() and entry['device_kind'] == jax.devices()[0].device_kind
  assert entry['host_cpu'] and entry['command'] and entry['time']
  assert json.load(open(os.path.join(trained, 'provenance.json'))) == [entry]


def test_a_config_that_is_not_json_is_a_clear_error(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(errors.WorkdirError, match='cannot be read'):
    workdir.load_config(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match='does not exist'):
    workdir.load_config(str(tmp_path / 'missing'))


def _hold(wd, host, pid, age_s=0.0):
  path = os.path.join(wd, workdir.LOCK)
  with open(path, 'w') as f:
    json.dump({'host': host, 'pid': pid, 'since': '2026-12-01T00:00:00'}, f)
  os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_second_train_on_a_held_workdir_exits_2_naming_the_holder_and_a_dead_holders_lock_is_taken(
  tmp_path, shakespeare_dirs, cache_dir
):
  wd = tmp_path / 'run'
  wd.mkdir()
  holder = subprocess.Popen(['sleep', '120'])  # a live process on this host holds the lock
  try:
    _hold(wd, socket.gethostname(), holder.pid)
    overrides = tiny_overrides(*shakespeare_dirs, **{'train.steps': 10, 'train.eval_every': 10}) + ONE_DEVICE
    proc = subprocess.run(
      tiny_train_command(wd, overrides),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [l for l in proc.stderr.splitlines() if l.startswith('lmjax train: error: ')]
    assert f'pid {holder.pid}' in line and socket.gethostname() in line and 'Traceback' not in proc.stderr
    assert sorted(os.listdir(wd)) == [workdir.LOCK]  # nothing written beside it
  finally:
    holder.kill()
    holder.wait()
  train_tiny(wd, shakespeare_dirs, 'train.steps=10', 'train.eval_every=10', cache=cache_dir)  # stale: taken over
  assert not (wd / workdir.LOCK).exists() and (wd / 'checkpoints' / '10').is_dir()  # and released at the end


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path):
  _hold(tmp_path, 'another-host', 1, age_s=10)
  with pytest.raises(errors.WorkdirError, match='another-host, pid 1'):
    workdir.Lock(str(tmp_path), stale_minutes=1).acquire()
  _hold(tmp_path, 'another-host', 1, age_s=120)
  lock = workdir.Lock(str(tmp_path), stale_minutes=1).acquire()
  assert json.load(open(tmp_path / workdir.LOCK))['pid'] == os.getpid()
  lock.release()
  assert not (tmp_path / workdir.LOCK).exists()


def test_train_refuses_a_non_empty_directory_it_did_not_write(tmp_path, shakespeare_dirs, capsys):
  (tmp_path / 'notes.txt').write_text('mine')
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE
  code = cli.main(['train', '--config=configs/tiny.py', f'--workdir={tmp_path}', *(f'--config.{o}' for o in overrides)])
  err = capsys.readouterr().err
  assert code == 2 and 'is not empty and holds notes.txt, which `lmjax train` does not write' in err, err
  assert sorted(os.listdir(tmp_path)) == ['notes.txt'] and (tmp_path / 'notes.txt').read_text() == 'mine'
