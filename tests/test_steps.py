"""The pure train step: the finiteness it reports, and what `skip_nonfinite` keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ONE_DEVICE, tiny_overrides

from lmjax import cli, compiling, config as config_lib, inference, model as model_lib, steps, workdir


def _setup():
  cfg = config_lib.ModelConfig(vocab_size=11, max_len=8, n_layers=1, n_heads=2, d_model=16).validate()
  m = model_lib.Transformer(cfg)
  params = compiling.run_once(jax.jit(m.init), jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  params = nn.meta.unbox(params)
  tx = optax.adamw(1e-2)
  return m, tx, steps.TrainState(jnp.int32(0), params, tx.init(params))


def _batch(poison: bool):
  t = jax.random.randint(jax.random.key(1), (2, 9), 0, 11)
  weights = jnp.ones((2, 8)).at[0, 3].set(jnp.nan if poison else 1.0)
  return {'inputs': t[:, :-1], 'targets': t[:, 1:], 'weights': weights}


@pytest.mark.parametrize('skip', [False, True])
def test_a_non_finite_loss_is_reported_and_skip_keeps_the_state(skip):
  m, tx, state = _setup()
  step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(2), model=m, tx=tx, skip_nonfinite=skip))
  good, metrics = step(state, _batch(poison=False))
  assert bool(metrics['finite']) and int(good.step) == 1
  bad, metrics = step(state, _batch(poison=True))
  assert not bool(metrics['finite']) and int(bad.step) == 1
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves((s.params, s.opt_state))]
  if skip:  # the update is dropped: parameters and optimizer state as before the step
    for x, y in zip(leaves(bad), leaves(state)):
      np.testing.assert_array_equal(x, y)
  else:
    assert not all(np.isfinite(x).all() for x in leaves(bad))


def _run_lr_1e3(tmp_path, shakespeare_dirs, capsys, *extra):
  overrides = (
    tiny_overrides(*shakespeare_dirs)
    + ONE_DEVICE
    + [
      'optimizer.lr=1e3',
      'optimizer.warmup_steps=0',
      'train.log_every=2',
      'train.checkpoint_every=2',
      'train.eval_every=0',
      'train.keep_checkpoints=2',
      *extra,
    ]
  )
  wd = tmp_path / 'run'
  code = cli.main(['train', '--config=configs/tiny.py', f'--workdir={wd}', *(f'--config.{o}' for o in overrides)])
  err = capsys.readouterr().err
  [line] = [l for l in err.splitlines() if l.startswith('lmjax train: error: ')]
  return code, line, str(wd)


def test_a_blown_up_run_stops_naming_the_step_and_every_kept_checkpoint_is_finite(tmp_path, shakespeare_dirs, capsys):
  code, line, wd = _run_lr_1e3(tmp_path, shakespeare_dirs, capsys)
  assert code == 2 and 'not finite at step' in line and 'train.nonfinite=skip' in line, line
  saved = sorted(int(s) for s in __import__('os').listdir(workdir.checkpoint_dir(wd)) if s.isdigit())
  assert saved and f'the last checkpoint is step {saved[-1]}' in line
  for step in saved:
    result = inference.evaluate_run(wd, ONE_DEVICE, step=step)
    assert np.isfinite(result['val_loss']), (step, result)


def test_skipping_drops_non_finite_updates_counts_them_and_stops_after_max_in_a_row(tmp_path, shakespeare_dirs, capsys):
  code, line, wd = _run_lr_1e3(tmp_path, shakespeare_dirs, capsys, 'train.nonfinite=skip', 'train.max_skipped=4')
  assert code == 2 and '4 updates in a row were skipped' in line, line
  from conftest import rows  # pylint: disable=import-outside-toplevel

  counts = [r['skipped_steps'] for r in rows(wd) if 'skipped_steps' in r]
  assert counts and counts == sorted(counts) and counts[-1] >= 4
  _, _, _, state = inference.load_run(wd, ONE_DEVICE)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_a_checkpoint_is_kept_only_once_the_loss_from_it_is_finite(tmp_path, shakespeare_dirs, capsys):
  # Found by trying it: with checkpoint_every=5 the parameters after step 10 were finite, so step 10 was saved, yet
  # the loss they give is not; the run only stopped at step 11. Now the save itself checks the loss of the state.
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + ['optimizer.lr=1e3', 'train.checkpoint_every=5']
  wd = tmp_path / 'run'
  code = cli.main(['train', '--config=configs/tiny.py', f'--workdir={wd}', *(f'--config.{o}' for o in overrides)])
  [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith('lmjax train: error: ')]
  assert code == 2, line
  saved = sorted(int(s) for s in __import__('os').listdir(workdir.checkpoint_dir(wd)) if s.isdigit())
  assert saved and f'the last checkpoint is step {saved[-1]}' in line, line
  for step in saved:
    result = inference.evaluate_run(str(wd), ONE_DEVICE, step=step)
    assert np.isfinite(result['val_loss']), (step, result)


@pytest.mark.parametrize('grad_accum', [1, 2])
def test_z_loss_adds_its_coefficient_times_mean_log_z_squared_to_the_loss_the_gradient_follows(grad_accum):
  # The reference: mean cross-entropy + c * mean((log sum exp logits)^2), from the logits, differentiated by autodiff.
  m, _, state = _setup()
  batch = _batch(poison=False)
  c = 0.1

  def reference(params):
    logits = m.apply({'params': params}, batch['inputs'])
    logz = jax.nn.logsumexp(logits, -1)
    nll = logz - jnp.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
    return jnp.mean(nll), c * jnp.mean(logz**2)

  nll, z = jax.jit(reference)(state.params)  # jitted: eager Flax dispatches op by op
  want = jax.jit(jax.grad(lambda p: sum(reference(p))))(state.params)
  sgd = optax.sgd(1.0)  # the update is minus the gradient: the gradient read back from the parameters
  state = state.replace(opt_state=sgd.init(state.params))
  new, metrics = jax.jit(
    lambda s, b: steps.train_step(s, b, jax.random.key(2), model=m, tx=sgd, z_loss=c, grad_accum=grad_accum)
  )(state, batch)
  np.testing.assert_allclose(metrics['train_loss'], nll, rtol=1e-6)
  np.testing.assert_allclose(metrics['z_loss'], z, rtol=1e-6)
  assert float(z) > 1e-3 * float(nll)  # large enough for the gradients below to tell it from its absence
  got = jax.tree.map(lambda a, b: a - b, state.params, new.params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4), got, want)
  _, plain = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(2), model=m, tx=sgd))(state, batch)
  assert 'z_loss' not in plain


def test_a_run_with_every_stability_option_trains_logs_z_loss_and_samples(tmp_path, shakespeare_dirs, capsys):
  from conftest import rows, train_tiny  # pylint: disable=import-outside-toplevel

  extra = ('train.z_loss=1e-3', 'train.steps=10', 'train.log_every=5', 'train.eval_every=10')
  stable = ('model.qk_norm=true', 'model.attn_softcap=30.0', 'model.final_softcap=15.0')
  train_tiny(tmp_path / 'run', shakespeare_dirs, *extra, *stable, 'train.checkpoint_every=10')
  logged = [r for r in rows(tmp_path / 'run') if 'train_loss' in r]
  assert [r['step'] for r in logged] == [5, 10] and all(r['z_loss'] > 0 for r in logged)
  capsys.readouterr()
  argv = ['sample', f'--workdir={tmp_path / "run"}', '--prompt=ROMEO:', '--max_new_tokens=40', '--seed=0']
  assert cli.main(argv + ['--config.mesh.data=1']) == 0  # through the KV cache, past max_len by the sliding window
  assert capsys.readouterr().out.startswith('ROMEO:')
  with pytest.raises(config_lib.ConfigError, match='train.z_loss must be >= 0'):
    config_lib.load('configs/tiny.py', ['train.z_loss=-1'])
