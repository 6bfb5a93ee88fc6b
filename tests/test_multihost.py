"""Multi-host: two local processes (4 CPU devices each, gloo collectives) train exactly like one 8-device process.

Uses the real `lmjax train` CLI with --coordinator/--num_processes/--process_id on 127.0.0.1, then restores the
two-process checkpoint onto a single device.
"""

import json
import os
import subprocess

import jax

try:  # tests/conftest.py does this for the whole suite; alone, this file must do it before JAX starts
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:
  pass

import numpy as np
import portpicker
import pytest
from conftest import tiny_train_command

from lmjax import config as config_lib, data as data_lib, inference, parallel, sources, train

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (simulated) devices')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANUAL_DIR = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare')
TIMEOUT_S = 300  # two processes compiling on a shared 2-core machine; a healthy run takes well under this
RUN = ['steps=6', 'log_every=2', 'eval_every=6', 'checkpoint_every=6', 'progress_bar=False']


def overrides(data_dir):
  return [f'train.{o}' for o in RUN] + [
    'mesh.data=2',
    'mesh.fsdp=4',
    f'data.manual_dir={MANUAL_DIR}',
    f'data.data_dir={data_dir}',
  ]


def losses(workdir, key):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r[key]) for r in map(json.loads, f) if key in r]


def _start_pair(workdir, log_dir, name, flags):
  """Two `lmjax train` processes of one jax.distributed job on 127.0.0.1 (4 CPU devices each); (procs, logs)."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
  port = portpicker.pick_unused_port()
  cmd = tiny_train_command(workdir, []) + [f'--coordinator=127.0.0.1:{port}', '--num_processes=2', *flags]
  logs = [open(os.path.join(log_dir, f'{name}_{i}.log'), 'w+') for i in range(2)]
  procs = [
    subprocess.Popen(cmd + [f'--process_id={i}'], cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
    for i in range(2)
  ]
  return procs, logs


def _finish_pair(procs, logs):
  """Waits for both processes (killing what outlives TIMEOUT_S); (exit codes, the tails of their logs)."""
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = ''
  for f in logs:
    f.seek(0)
    text += f.name + ':\n' + f.read()[-3000:] + '\n'
    f.close()
  return [p.returncode for p in procs], text


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  if not os.path.exists(os.path.join(MANUAL_DIR, 'input.txt')):
    pytest.skip(f'no Tiny Shakespeare at {MANUAL_DIR}')
  data_dir = str(tmp_path / 'tfds')
  sources.prepare_tiny_shakespeare(data_dir, MANUAL_DIR)  # once, here: the two processes must not race to build it
  two = str(tmp_path / 'two_processes')
  pair = _start_pair(two, tmp_path, 'process', [f'--config.{o}' for o in overrides(data_dir)])
  # The reference trains in this process (8 devices) while the two processes run.
  one = str(tmp_path / 'one_process')
  try:
    train.train(config_lib.load('configs/tiny.py', overrides(data_dir)), one)
  finally:
    codes, tails = _finish_pair(*pair)
  assert codes == [0, 0], tails

  got, want = losses(two, 'train_loss'), losses(one, 'train_loss')
  assert [s for s, _ in got] == [2, 4, 6], tails
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  np.testing.assert_allclose(losses(two, 'val_loss')[-1][1], losses(one, 'val_loss')[-1][1], rtol=1e-5)

  # Only process 0 wrote logs and the resolved config; both wrote their share of the checkpoint.
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  assert sorted(os.listdir(os.path.join(two, 'checkpoints', '6', 'data'))) == [
    'commit_success.txt',
    'process_0-of-2.json',
    'process_1-of-2.json',
  ]

  # The checkpoint written by 2 processes x 4 devices restores onto one device and evaluates to the same loss.
  config, tokenizer, engine, state = inference.load_run(
    two,
    mesh=parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]),
    overrides=('mesh.data=1', 'mesh.fsdp=1'),
    params_only=True,
  )
  assert int(state.step) == 6 and state.params['embed'].sharding.mesh.size == 1 and state.opt_state is None
  data = data_lib.make_data(config, tokenizer)
  val = engine.evaluate(state.params, data.eval_batches)['val_loss']
  np.testing.assert_allclose(val, losses(two, 'val_loss')[-1][1], rtol=1e-5)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_resumed_pair_equals_the_uninterrupted(
  tmp_path,
):
  if not os.path.exists(os.path.join(MANUAL_DIR, 'input.txt')):
    pytest.skip(f'no Tiny Shakespeare at {MANUAL_DIR}')
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  data_dir = str(tmp_path / 'tfds')
  sources.prepare_tiny_shakespeare(data_dir, MANUAL_DIR)
  run = [f'--config.{o}' for o in overrides(data_dir)] + [
    '--config.train.steps=40',
    '--config.train.eval_every=40',
    '--config.train.checkpoint_every=40',
    '--config.train.log_every=2',
  ]

  start = lambda workdir, name: _start_pair(workdir, tmp_path, name, run)
  finish = _finish_pair

  whole, stopped = str(tmp_path / 'whole'), str(tmp_path / 'stopped')
  ref = start(whole, 'whole')  # the uninterrupted pair runs beside the interrupted one
  procs, logs = start(stopped, 'stopped')
  deadline = time.time() + TIMEOUT_S
  while not os.path.exists(os.path.join(stopped, 'metrics.jsonl')) or not losses(stopped, 'train_loss'):
    assert time.time() < deadline and all(p.poll() is None for p in procs), 'training did not start'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 must learn of it and stop at the same step
  codes, text = finish(procs, logs)
  assert codes == [143, 143], text
  [step] = [int(s) for s in os.listdir(os.path.join(stopped, 'checkpoints')) if s.isdigit()]
  assert 0 < step < 40, text
  assert sorted(os.listdir(os.path.join(stopped, 'checkpoints', str(step), 'data'))) == [
    'commit_success.txt',
    'process_0-of-2.json',
    'process_1-of-2.json',
  ]
  codes, text = finish(*start(stopped, 'resumed'))
  assert codes == [0, 0], text
  codes, text = finish(*ref)
  assert codes == [0, 0], text
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  one = ('mesh.data=1', 'mesh.fsdp=1')
  _, _, _, a = inference.load_run(whole, one, mesh=mesh, params_only=False)
  _, _, _, b = inference.load_run(stopped, one, mesh=mesh, params_only=False)
  assert int(a.step) == int(b.step) == 40
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_second_two_process_job_on_a_held_workdir_stops_on_every_process(tmp_path):
  import socket  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(['sleep', '120'])  # the first job, alive on this host
  try:
    with open(workdir / 'lock.json', 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': holder.pid, 'since': '2026-12-01T00:00:00'}, f)
    codes, text = _finish_pair(*_start_pair(workdir, tmp_path, 'second', [f'--config.{o}' for o in overrides('')]))
  finally:
    holder.kill()
    holder.wait()
  assert codes == [2, 2], text  # process 0 found the lock; process 1 learned it from process 0 and stopped too
  assert f'pid {holder.pid}' in text and 'Traceback' not in text
  assert sorted(os.listdir(workdir)) == ['lock.json']


@pytest.mark.parametrize(
  'env, joins',
  [
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),  # one host (what lmjax.topology sets for compile-only slices)
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'}, True),  # a TPU VM pod
    ({'SLURM_JOB_ID': '7'}, True),
    ({}, False),
  ],
)
def test_only_an_environment_naming_several_hosts_joins_a_multi_host_job(monkeypatch, env, joins):
  # Found by CI: after a TPU plan in the same process set TPU_WORKER_HOSTNAMES=localhost, every later run called
  # jax.distributed.initialize() and failed.
  from lmjax import hostenv

  for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  hostenv.init_distributed()
  assert bool(calls) == joins
