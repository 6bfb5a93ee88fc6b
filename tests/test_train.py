"""Training end to end on the tiny config: learning, metrics, checkpoints, exact resume, preemption, errors."""

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE, REPO, rows as _rows, tiny_overrides, tiny_train_command, train_tiny as _train

from lmjax import actions, cli, config as config_lib, data as data_lib, errors, hostenv, inference, metrics, parallel
from lmjax import train, workdir
from lmjax.steps import TrainState
from lmjax.engine import Engine


def test_loss_falls_and_metrics_are_written(trained):
  rows = _rows(trained)
  train_rows = [r for r in rows if 'train_loss' in r]
  assert [r['step'] for r in train_rows] == [10, 20, 30, 40, 50, 60]
  for key in ('train_loss', 'tokens_per_sec', 'mfu', 'lr', 'grad_norm'):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  assert train_rows[-1]['train_loss'] < train_rows[0]['train_loss'] - 0.4  # ln(65) = 4.17 at init
  evals = [r for r in rows if 'val_loss' in r]
  assert [r['step'] for r in evals] == [30, 60] and evals[1]['val_loss'] < evals[0]['val_loss']
  assert os.listdir(os.path.join(trained, 'tensorboard'))
  saved = json.load(open(os.path.join(trained, 'config.json')))
  assert saved['model']['vocab_size'] == 65 and saved['train']['steps'] == 60


def test_step_timer_gives_each_window_the_time_of_its_own_steps():
  """The loop reads step N's metrics after queueing N+1. Where dispatch is synchronous, N+1 has already run by
  then; its time must not be charged to N's window while its steps land in the next (a logged 23M tokens/s)."""
  now = [0.0]
  timer = metrics.StepTimer(0, clock=lambda: now[0])
  now[0] = 2.0  # steps 1-20 ran; the read of step 10 finds step 20's call finished too
  assert timer.read(20) == pytest.approx(0.1)
  now[0] = 2.001  # the read of step 20 right after: nothing new finished, no figure rather than 10k steps/s
  assert timer.read(20) is None
  now[0] = 3.0  # asynchronous dispatch: step 30 read while 40 still runs; the window still opened at 2.0
  assert timer.read(30) == pytest.approx(0.1)
  now[0] = 10.0
  timer.restart(30)  # an eval ran: its time belongs to no window
  now[0] = 11.0
  assert timer.read(40) == pytest.approx(0.1)


def test_checkpoints_are_kept_at_the_configured_steps(trained):
  assert sorted(int(s) for s in os.listdir(os.path.join(trained, 'checkpoints')) if s.isdigit()) == [30, 60]


def test_intervals_of_zero_mean_only_at_the_last_step(tmp_path, shakespeare_dirs, cache_dir):
  _train(
    tmp_path / 'run',
    shakespeare_dirs,
    'train.steps=20',
    'optimizer.decay_steps=60',
    'train.eval_every=0',
    'train.checkpoint_every=0',
    'train.log_every=0',
    cache=cache_dir,
  )
  rows = _rows(tmp_path / 'run')
  assert [r['step'] for r in rows if 'val_loss' in r] == [20]
  assert [r['step'] for r in rows if 'train_loss' in r] == [20]
  assert [s for s in os.listdir(tmp_path / 'run' / 'checkpoints') if s.isdigit()] == ['20']


def test_eval_of_a_workdir_reproduces_the_final_val_loss(trained):
  result = inference.evaluate_run(trained, ONE_DEVICE)
  last = [r for r in _rows(trained) if 'val_loss' in r][-1]
  assert result['step'] == 60
  assert result['val_loss'] == pytest.approx(last['val_loss'], rel=1e-6)


def test_resumed_run_equals_the_uninterrupted_run_bitwise(tmp_path, shakespeare_dirs, cache_dir):
  # The schedule ends at step 60 in both runs; the interrupted one first stops at 30, then resumes to 60.
  _train(tmp_path / 'whole', shakespeare_dirs, cache=cache_dir)
  _train(tmp_path / 'split', shakespeare_dirs, 'train.steps=30', 'optimizer.decay_steps=60', cache=cache_dir)
  _train(tmp_path / 'split', shakespeare_dirs, 'optimizer.decay_steps=60', cache=cache_dir)
  loss = lambda d: {r['step']: r['train_loss'] for r in _rows(d) if 'train_loss' in r}
  whole, split = loss(tmp_path / 'whole'), loss(tmp_path / 'split')
  assert [split[s] for s in (40, 50, 60)] == [whole[s] for s in (40, 50, 60)]
  _, _, _, a = inference.load_run(str(tmp_path / 'whole'), ONE_DEVICE, params_only=False)
  _, _, _, b = inference.load_run(str(tmp_path / 'split'), ONE_DEVICE, params_only=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  first, resumed = workdir.read_provenance(str(tmp_path / 'split'))  # provenance: one entry per start
  assert first['git_commit'] == resumed['git_commit'] and first['versions'] == resumed['versions']


def test_a_repeated_run_loads_its_programs_without_tracing_and_computes_the_same(tmp_path, shakespeare_dirs, capsys):
  # A width no other test trains keeps JAX's own persistent cache, which the tests share, from serving it.
  extra = ('model.d_model=24', 'train.steps=20', 'train.eval_every=20', 'train.checkpoint_every=20')
  cache = str(tmp_path / 'cache')
  _train(tmp_path / 'first', shakespeare_dirs, *extra, cache=cache)
  assert 'train step compiled' in capsys.readouterr().out
  _train(tmp_path / 'again', shakespeare_dirs, *extra, cache=cache)
  assert 'train step loaded from the cache' in capsys.readouterr().out
  entries = sorted(
    (n.split('-')[0], os.path.splitext(n)[1]) for n in os.listdir(os.path.join(cache, 'lmjax_executables'))
  )
  assert entries == [  # each program stored once, named by its inputs key; the abstract state beside them
    ('abstract_state', '.value'),
    ('eval_step', '.key'),
    ('eval_step', '.pkl'),
    ('init_state', '.key'),
    ('init_state', '.pkl'),
    ('train_step', '.key'),
    ('train_step', '.pkl'),
  ]
  assert _rows_without_time(tmp_path / 'first') == _rows_without_time(tmp_path / 'again')
  # Evaluating the run outside training (another config, as `lmjax eval` has) traces its eval step once and loads
  # the executable training stored; the next evaluation loads it untraced. Both compute the loss training logged.
  logged = [r for r in _rows(tmp_path / 'again') if 'val_loss' in r][-1]
  for origin in ('lmjax cache, traced', 'lmjax cache'):
    config, _, engine, state = inference.load_run(str(tmp_path / 'again'), ONE_DEVICE)
    data = data_lib.make_data(config, workdir.load_tokenizer(str(tmp_path / 'again')))
    got = engine.evaluate(state.params, data.eval_batches, data.eval_bytes_per_token)
    assert engine.executables.origin['eval_step'] == origin
    assert got['val_loss'] == pytest.approx(logged['val_loss'], rel=1e-6)


def _rows_without_time(workdir):
  skip = ('time', 'tokens_per_sec', 'mfu', 'ms_per_step')
  return [{k: v for k, v in r.items() if k not in skip} for r in _rows(workdir)]


def test_steps_per_call_runs_the_same_steps(tmp_path, shakespeare_dirs, trained):
  # 10 steps inside one jitted call (lax.scan over 10 batches) are the same 60 optimizer steps on the same data.
  _train(tmp_path / 'k10', shakespeare_dirs, 'train.steps_per_call=10')
  loss = lambda d: [(r['step'], r['train_loss']) for r in _rows(d) if 'train_loss' in r]
  val = lambda d: [(r['step'], r['val_loss']) for r in _rows(d) if 'val_loss' in r]
  for got, want in ((loss(tmp_path / 'k10'), loss(trained)), (val(tmp_path / 'k10'), val(trained))):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


def test_a_checkpoint_of_another_model_is_a_clear_error_and_the_workdir_is_untouched(trained, shakespeare_dirs):
  before = {f: open(os.path.join(trained, f)).read() for f in ('config.json', 'tokenizer.json', 'metrics.jsonl')}
  with pytest.raises(config_lib.ConfigError, match=r'model\.d_model: checkpoint 32 vs run 64'):
    _train(trained, shakespeare_dirs, 'model.d_model=64')
  assert before == {f: open(os.path.join(trained, f)).read() for f in before}


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, shakespeare_dirs):
  workdir = tmp_path / 'run'
  long_run = {'train.steps': 100000, 'train.checkpoint_every': 100000, 'train.eval_every': 100000}
  cmd = tiny_train_command(workdir, tiny_overrides(*shakespeare_dirs, **long_run))
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while not (workdir / 'metrics.jsonl').exists() or not (workdir / 'metrics.jsonl').read_text():
      assert proc.poll() is None and time.time() < deadline, 'training did not start'
      time.sleep(0.5)
    # lmjax restarted itself (same pid: the signal still reaches it) with huge pages for malloc, and on jemalloc
    # where it is installed (lmjax/hostenv.py).
    environ = dict(kv.split(b'=', 1) for kv in open(f'/proc/{proc.pid}/environ', 'rb').read().split(b'\0') if kv)
    assert b'glibc.malloc.hugetlb=1' in environ[b'GLIBC_TUNABLES'] and environ[b'LMJAX_TUNED'] == b'1'
    preload = environ.get(b'LD_PRELOAD', b'').decode()
    assert ('libjemalloc' in preload) == ('libjemalloc' in open(f'/proc/{proc.pid}/maps').read())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143, out
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert f'saved a checkpoint at step {steps[0]}' in out


def test_the_command_restarts_with_a_tuned_allocator_once_and_respects_the_users_choice(monkeypatch):
  monkeypatch.setattr(hostenv, '_cpu_only', lambda environ: True)
  monkeypatch.setattr(hostenv, 'find_jemalloc', lambda: '')  # a host without jemalloc: huge pages for glibc only
  env = hostenv.tuned_environ({'GLIBC_TUNABLES': 'glibc.malloc.check=0', 'HOME': '/h'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.check=0:glibc.malloc.hugetlb=1', 'HOME': '/h', 'LMJAX_TUNED': '1'}
  assert hostenv.tuned_environ(env) is None  # the restarted process does not restart again
  assert hostenv.tuned_environ({'LMJAX_NO_REEXEC': '1'}) is None
  je = '/usr/lib/libjemalloc.so.2'
  monkeypatch.setattr(hostenv, 'find_jemalloc', lambda: je)  # a host with jemalloc: preloaded, purging off
  env = hostenv.tuned_environ({'HOME': '/h'})
  assert env['LD_PRELOAD'] == je and env['MALLOC_CONF'] == hostenv._JEMALLOC_CONF
  assert hostenv.tuned_environ(env) is None
  # the user's own choices stand: huge pages off, their MALLOC_CONF, any preload of theirs, glibc, accelerators
  env = hostenv.tuned_environ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0', 'MALLOC_CONF': 'narenas:2'})
  assert (env['GLIBC_TUNABLES'], env['LD_PRELOAD'], env['MALLOC_CONF']) == ('glibc.malloc.hugetlb=0', je, 'narenas:2')
  for preload in ('/opt/libtcmalloc_minimal.so.4', '/opt/libasan.so.8'):
    assert hostenv.tuned_environ({'LD_PRELOAD': preload})['LD_PRELOAD'] == preload
  assert 'LD_PRELOAD' not in hostenv.tuned_environ({'LMJAX_ALLOCATOR': 'glibc'})
  monkeypatch.undo()
  assert 'LD_PRELOAD' not in hostenv.tuned_environ({'JAX_PLATFORMS': 'cuda,cpu'})
  assert hostenv._cpu_only({'JAX_PLATFORMS': 'cpu'}) and not hostenv._cpu_only({'JAX_PLATFORMS': 'tpu'})


@pytest.mark.parametrize('key, value', [('steps', 0), ('log_every', -1), ('eval_every', -10), ('checkpoint_every', -5)])
def test_a_negative_interval_or_no_steps_is_a_clear_error(tmp_path, shakespeare_dirs, key, value):
  with pytest.raises(config_lib.ConfigError, match=rf'train\.{key} \({value}\) must be'):
    _train(tmp_path / 'bad', shakespeare_dirs, f'train.{key}={value}')
  assert not (tmp_path / 'bad' / 'checkpoints').exists()


def test_missing_input_txt_is_a_clear_error_naming_path_size_and_checksum(tmp_path, capsys, no_network):
  code = cli.main(
    [
      'train',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path / "run"}',
      f'--config.data.manual_dir={tmp_path}',
      f'--config.data.data_dir={tmp_path / "tfds"}',
    ]
  )
  err = capsys.readouterr().err
  assert code == 2
  assert str(tmp_path / 'input.txt') in err and '1115394' in err
  assert '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed' in err


def test_a_step_larger_than_host_memory_is_refused_before_it_runs(tmp_path, shakespeare_dirs, monkeypatch):
  # The tiny config's step needs a few MiB; a host with 64 KiB to give cannot run it.
  monkeypatch.setattr(hostenv, 'memory_bytes', lambda: 64 << 10)
  with pytest.raises(config_lib.ConfigError, match=r'needs [\d.]+ GiB of host memory .* train\.batch_size'):
    _train(tmp_path / 'big', shakespeare_dirs)
  assert not list((tmp_path / 'big').glob('checkpoints/*'))  # refused before any step: nothing half-written
  monkeypatch.setattr(hostenv, 'memory_bytes', lambda: 64 << 30)
  assert _train(tmp_path / 'fits', shakespeare_dirs, 'train.steps=2')['train_loss'] > 0


def test_host_memory_is_available_plus_swap_plus_what_the_process_holds(tmp_path):
  meminfo, statm = tmp_path / 'meminfo', tmp_path / 'statm'
  meminfo.write_text(
    'MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:    2000 kB\n'
    'SwapTotal:       5000 kB\nSwapFree:        3000 kB\nHugePages_Total:       0\n'
  )
  statm.write_text('1000 10 5 1 0 20 0\n')
  assert hostenv.memory_bytes(str(meminfo), str(statm)) == 1024 * (2000 + 3000) + 10 * os.sysconf('SC_PAGE_SIZE')
  meminfo.write_text('MemTotal:       24000000 kB\n')  # an old kernel without MemAvailable: no guess
  assert hostenv.memory_bytes(str(meminfo), str(statm)) is None
  assert hostenv.memory_bytes(str(tmp_path / 'missing'), str(statm)) is None


def test_init_from_starts_from_the_other_runs_parameters_exactly_with_its_own_schedule(
  tmp_path, trained, shakespeare_dirs, cache_dir
):
  own = [
    'train.steps=1',
    'train.log_every=1',
    'train.eval_every=1',
    'train.checkpoint_every=1',
    'optimizer.lr=5e-4',
    'optimizer.warmup_steps=0',
  ]
  _train(tmp_path / 'ft', shakespeare_dirs, *own, f'train.init_from={trained}', cache=cache_dir)
  assert (tmp_path / 'ft' / 'tokenizer.json').read_text() == open(os.path.join(trained, 'tokenizer.json')).read()
  # The same step taken by hand: the other run's parameters, a fresh optimizer state, this run's first batch.
  config = config_lib.load('configs/tiny.py', tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + own)
  _, tokenizer, _, src = inference.load_run(trained, ONE_DEVICE)
  with jax.default_device(jax.devices()[0]):
    data = train.prepare_data(config, str(tmp_path / 'scratch'), tokenizer)
    engine = Engine(config)
    start = TrainState(jnp.int32(0), src.params, engine.tx.init(src.params))
    batch = parallel.put_batch({k: v[None] for k, v in next(data.train_iter).items()}, engine.batch_sharding)
    with parallel.activate(engine.mesh):
      want, _ = engine.train_fn(start, batch, engine.dropout_rng)
  _, _, _, got = inference.load_run(str(tmp_path / 'ft'), ONE_DEVICE, params_only=False)
  assert int(got.step) == 1
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  [row] = [r for r in _rows(tmp_path / 'ft') if 'train_loss' in r]
  assert row['lr'] == pytest.approx(5e-4)  # its own schedule, not the source's
  assert row['train_loss'] < 3.5  # a fresh init starts at ln(65) = 4.17


def test_init_from_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path, shakespeare_dirs):
  with pytest.raises(errors.WorkdirError, match='is not a directory'):
    _train(tmp_path / 'ft', shakespeare_dirs, f'train.init_from={tmp_path / "nowhere"}')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.WorkdirError, match='holds no tokenizer.json'):
    _train(tmp_path / 'ft', shakespeare_dirs, f'train.init_from={tmp_path / "empty"}')


class _CrashAt(actions.Action):
  def __init__(self, step):
    super().__init__(every=step, at_last_step=False)

  def run(self, loop):
    raise RuntimeError(f'injected crash at step {loop.step}')


def test_metrics_hold_one_row_per_step_and_kind_after_a_crash_and_resume(
  tmp_path, trained, shakespeare_dirs, cache_dir
):
  # Checkpoints at 30 and 60; the crash at step 50 comes after rows for 40 and 50 were written past the checkpoint.
  with pytest.raises(RuntimeError, match='injected crash at step 50'):
    _train(tmp_path / 'run', shakespeare_dirs, cache=cache_dir, actions=[_CrashAt(50)])
  assert [r['step'] for r in _rows(tmp_path / 'run') if 'train_loss' in r] == [10, 20, 30, 40, 50]
  with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 60, "train_lo')  # and a torn last line, as a kill mid-write leaves
  _train(tmp_path / 'run', shakespeare_dirs, cache=cache_dir)
  got = _rows_without_time(tmp_path / 'run')
  assert got == _rows_without_time(trained)  # the uninterrupted run's rows, each once


def test_non_finite_metrics_are_written_as_strict_json_null(tmp_path):
  log = metrics.Logger(str(tmp_path), progress_bar=False)
  log.write(3, {'train_loss': float('nan'), 'grad_norm': float('inf'), 'lr': 1e-3}, echo=False)
  log.close()
  line = (tmp_path / 'metrics.jsonl').read_text()
  assert json.loads(line) == {
    'step': 3,
    'time': json.loads(line)['time'],
    'train_loss': None,
    'grad_norm': None,
    'lr': 1e-3,
  }
  assert 'NaN' not in line and 'Infinity' not in line
