"""Profiling: a trace of exactly the requested training steps, and nothing else changes."""

import glob
import gzip
import json
import os

from conftest import rows, train_tiny


def _traced_steps(log_dir):
  """The lmjax_step_N annotations in a jax.profiler trace directory's Perfetto JSON."""
  [path] = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.trace.json.gz'))
  events = json.load(gzip.open(path))
  events = events['traceEvents'] if isinstance(events, dict) else events
  return sorted({int(e['name'].split('_')[-1]) for e in events if str(e.get('name', '')).startswith('lmjax_step_')})


def test_profiling_traces_exactly_the_requested_steps_and_changes_no_metric(
  tmp_path, trained, shakespeare_dirs, cache_dir
):
  wd = tmp_path / 'run'
  train_tiny(wd, shakespeare_dirs, 'train.profile_steps=(20, 5)', cache=cache_dir)
  assert _traced_steps(wd / 'profile') == [21, 22, 23, 24, 25]
  skip = ('time', 'tokens_per_sec', 'mfu', 'ms_per_step')
  strip = lambda d: [{k: v for k, v in r.items() if k not in skip} for r in rows(d)]
  assert strip(wd) == strip(trained)


def test_bench_profile_traces_the_timed_steps(tmp_path, capsys):
  from lmjax import cli  # pylint: disable=import-outside-toplevel

  argv = [
    'bench',
    '--config=configs/tiny.py',
    '--steps=2',
    f'--profile={tmp_path / "trace"}',
    '--config.train.compilation_cache_dir=',
    '--config.model.n_layers=1',
  ]
  assert cli.main(argv) == 0
  assert 'trace of the timed steps' in capsys.readouterr().out
  [path] = glob.glob(os.path.join(tmp_path, 'trace', 'plugins', 'profile', '*', '*.trace.json.gz'))
  assert os.path.getsize(path) > 0
