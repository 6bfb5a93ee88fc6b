"""Metric sinks (train.trackers): Weights & Biases offline runs read back with wandb's own record format, resume
into the same W&B run, and a failing sink is one warning."""

import json
import os
import struct

import pytest
from conftest import rows, train_tiny

from lmjax import config as config_lib, sinks
from lmjax.errors import ConfigError

wandb = pytest.importorskip('wandb')  # the [wandb] extra; the test extra installs it
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK = 32 * 1024  # the .wandb transaction log: a 7-byte header, then LevelDB-log records in 32 KiB blocks
_HEADER = 7


def _wandb_records(path):
  """The Record protos of a .wandb file, in order (FULL, or FIRST/MIDDLE/LAST fragments joined)."""
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B', data[:8]
  pos, parts, out = _HEADER, b'', []
  while pos + 7 <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < 7:  # a block's tail too short for a record header is padding
      pos += left
      continue
    _, length, kind = struct.unpack('<IHB', data[pos : pos + 7])
    chunk = data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind == 0:  # zero padding at a block's end
      pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
      continue
    parts = chunk if kind in (1, 2) else parts + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      out.append(record)
  return out


def _history(workdir):
  """{step: {key: value}} of every offline W&B run in the workdir (all its starts), as wandb recorded it."""
  runs = os.path.join(workdir, 'wandb')
  out = {}
  for d in sorted(os.listdir(runs)):
    if not d.startswith('offline-run-'):
      continue
    [log] = [f for f in os.listdir(os.path.join(runs, d)) if f.endswith('.wandb')]
    for record in _wandb_records(os.path.join(runs, d, log)):
      if record.WhichOneof('record_type') == 'history':
        items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        step = items.pop('_step')
        out.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith('_')})
  return out


def _jsonl_by_step(workdir):
  out = {}
  for r in rows(workdir):
    out.setdefault(r['step'], {}).update({k: v for k, v in r.items() if k not in ('step', 'time') and v is not None})
  return out


def _run_ids(workdir):
  return sorted(
    {d.rsplit('-', 1)[1] for d in os.listdir(os.path.join(workdir, 'wandb')) if d.startswith('offline-run-')}
  )


WANDB_OFFLINE = ('train.trackers=jsonl,wandb', 'wandb.mode=offline', 'train.checkpoint_every=10')


def test_a_wandb_offline_run_holds_the_rows_of_metrics_jsonl_and_a_resume_continues_it(
  tmp_path, shakespeare_dirs, monkeypatch
):
  monkeypatch.setenv('WANDB_SILENT', 'true')
  wd = tmp_path / 'run'
  train_tiny(wd, shakespeare_dirs, *WANDB_OFFLINE, 'train.steps=20')
  first = _run_ids(wd)
  assert len(first) == 1 and json.load(open(wd / sinks.WANDB_RUN))['id'] == first[0]
  train_tiny(wd, shakespeare_dirs, *WANDB_OFFLINE, 'train.steps=40')  # resumes at step 20 in the same W&B run
  assert _run_ids(wd) == first
  logged, recorded = _history(wd), _jsonl_by_step(wd)
  assert sorted(recorded) == [10, 20, 30, 40] and sorted(logged) == sorted(recorded)
  for step, row in recorded.items():
    assert logged[step].keys() == row.keys(), step
    for k, v in row.items():
      assert logged[step][k] == pytest.approx(v, rel=1e-6), (step, k)


class _Broken(sinks.Sink):
  name = 'tensorboard'

  def __init__(self, config, workdir, start_step):
    self.writes = 0

  def write(self, step, row):
    raise OSError('the tracker went away')


class _Unopenable(sinks.Sink):
  name = 'tensorboard'

  def __init__(self, config, workdir, start_step):
    raise PermissionError('bad key')


@pytest.mark.parametrize('broken', [_Broken, _Unopenable], ids=['fails-writing', 'fails-opening'])
def test_a_failing_sink_is_one_warning_and_the_run_goes_on(tmp_path, shakespeare_dirs, monkeypatch, capsys, broken):
  monkeypatch.setitem(sinks.SINKS, 'tensorboard', broken)
  wd = tmp_path / 'run'
  train_tiny(wd, shakespeare_dirs, 'train.steps=20', 'train.checkpoint_every=10')
  out = capsys.readouterr()
  warnings = [l for l in (out.out + out.err).splitlines() if 'the tensorboard tracker' in l]
  assert len(warnings) == 1 and 'the run goes on without it' in warnings[0], warnings
  assert sorted(_jsonl_by_step(wd)) == [10, 20]  # the other sinks got every row
  assert sorted(int(s) for s in os.listdir(wd / 'checkpoints') if s.isdigit()) == [10, 20]


def test_an_unknown_tracker_or_wandb_mode_is_a_config_error():
  config = config_lib.default_config()
  config.train.trackers = 'jsonl,mlflow'
  config.wandb.mode = 'sometimes'
  with pytest.raises(ConfigError, match=r'unknown mlflow; choose from jsonl, tensorboard, wandb.*wandb.mode'):
    config_lib.validate(config)
