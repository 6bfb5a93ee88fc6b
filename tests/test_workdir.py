"""What a workdir holds: references, writability, and the provenance of every start."""

import json
import os

import jax
import pytest

from lmjax import errors, workdir


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
