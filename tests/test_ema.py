"""train.ema_decay: the parameters' moving average, its checkpoint and resume, and reading it with --params=ema."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ONE_DEVICE, rows, train_tiny

from lmjax import cli, inference, optim

EMA = ('train.ema_decay=0.9', 'train.log_every=5', 'train.eval_every=10', 'train.checkpoint_every=10')


def test_the_ema_follows_its_recurrence_over_the_parameters_each_update_leaves():
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array(0.5)}
  tx = optax.chain(optax.sgd(0.1), optim.ema(0.75))
  state = tx.init(params)
  want = jax.tree.map(np.asarray, params)
  for i in range(3):
    grads = jax.tree.map(lambda p: (i + 1.0) * p + 1.0, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * np.asarray(p), want, params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), optim.ema_params(state), want)
  assert not np.allclose(optim.ema_params(state)['w'], params['w'])  # an average, not the parameters
  assert optim.ema_params(optax.sgd(0.1).init(params)) is None


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory, shakespeare_dirs, cache_dir):
  workdir = tmp_path_factory.mktemp('ema')
  train_tiny(workdir, shakespeare_dirs, *EMA, 'train.steps=20', cache=cache_dir)
  return str(workdir)


def test_a_resumed_run_restores_the_ema_bitwise(ema_run, tmp_path, shakespeare_dirs, cache_dir):
  split = tmp_path / 'split'
  train_tiny(split, shakespeare_dirs, *EMA, 'train.steps=10', 'optimizer.decay_steps=20', cache=cache_dir)
  train_tiny(split, shakespeare_dirs, *EMA, 'train.steps=20', 'optimizer.decay_steps=20', cache=cache_dir)
  load = lambda d: inference.load_run(str(d), ONE_DEVICE, params_only=False)[3]
  whole, resumed = load(ema_run), load(split)
  # the schedule's decay_steps differ in the recorded configs, not in the schedule: every leaf, the EMA among them
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert optim.ema_params(whole.opt_state) is not None


def test_evaluations_log_both_and_eval_sample_and_export_read_the_chosen_parameters(ema_run, tmp_path, capsys):
  logged = {r['step']: r for r in rows(ema_run) if 'val_loss' in r}
  assert sorted(logged) == [10, 20] and all(r['ema_val_loss'] != r['val_loss'] for r in logged.values())
  capsys.readouterr()
  for params, key in (('raw', 'val_loss'), ('ema', 'ema_val_loss')):
    assert cli.main(['eval', f'--workdir={ema_run}', f'--params={params}', '--config.mesh.data=1']) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got['val_loss'] == pytest.approx(logged[20][key], rel=1e-6), params
  argv = ['sample', f'--workdir={ema_run}', '--prompt=ROMEO:', '--max_new_tokens=20', '--greedy']
  texts = {}
  for params in ('raw', 'ema'):
    assert cli.main(argv + [f'--params={params}', '--config.mesh.data=1']) == 0
    texts[params] = capsys.readouterr().out
  assert texts['raw'].startswith('ROMEO:') and texts['ema'].startswith('ROMEO:')
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  assert cli.main(['export-hf', f'--workdir={ema_run}', '--params=ema', f'--to={tmp_path / "hf"}']) == 0
  state = inference.load_run(ema_run, ONE_DEVICE, params_only=False)[3]
  exported = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  np.testing.assert_array_equal(exported['transformer.wte.weight'], optim.ema_params(state.opt_state)['embed'])
  assert not np.array_equal(exported['transformer.wte.weight'], state.params['embed'])


def test_params_ema_of_a_run_without_an_ema_is_one_line(trained, capsys):
  assert cli.main(['eval', f'--workdir={trained}', '--params=ema']) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax eval: error: --params=ema:') and 'train.ema_decay was 0' in line


def test_the_ema_is_laid_out_like_the_parameters_on_a_sharded_mesh():
  from lmjax import config as config_lib, engine  # pylint: disable=import-outside-toplevel

  config = config_lib.load(
    'configs/tiny.py', ['model.vocab_size=64', 'mesh.fsdp=4', 'mesh.data=2', 'train.ema_decay=0.9']
  )
  e = engine.Engine(config)
  ema = optim.ema_params(e.state_shardings.opt_state)
  assert jax.tree.structure(ema) == jax.tree.structure(e.param_shardings)
  assert jax.tree.leaves(ema) == jax.tree.leaves(e.param_shardings)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(ema))  # some are split, as their parameters are
