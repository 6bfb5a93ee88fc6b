"""The learning-rate schedules against their formulas, what the config refuses, and `lmjax schedule`."""

import math

import numpy as np
import pytest

from lmjax import cli, config as config_lib, optim

T, WARMUP, COOLDOWN, LR, MIN_LR = 60, 6, 20, 1.0, 0.1


def _oc(schedule, **kw):
  c = config_lib.default_config()
  o = c.optimizer
  o.schedule, o.warmup_steps, o.lr, o.min_lr, o.cooldown_steps = schedule, WARMUP, LR, MIN_LR, COOLDOWN
  for k, v in kw.items():
    o[k] = v
  return o


def _formula(schedule, step, shape='linear', cooldown=COOLDOWN):
  """The textbook curves, in float64, for a run of T steps."""
  if step < WARMUP:
    return LR * step / WARMUP
  if schedule == 'constant':
    return LR
  if schedule == 'inverse_sqrt':
    return LR * math.sqrt(WARMUP / step)
  if schedule in ('cosine', 'linear'):
    t = (step - WARMUP) / (T - WARMUP)
    left = 1 - t if schedule == 'linear' else 0.5 * (1 + math.cos(math.pi * t))
    return MIN_LR + (LR - MIN_LR) * left
  start = T - cooldown
  if step < start or not cooldown:
    return LR
  t = (step - start) / cooldown
  left = {'linear': 1 - t, 'cosine': 0.5 * (1 + math.cos(math.pi * t)), '1-sqrt': 1 - math.sqrt(t)}[shape]
  return MIN_LR + (LR - MIN_LR) * left


@pytest.mark.parametrize(
  'schedule,shape',
  [('cosine', ''), ('linear', ''), ('constant', ''), ('inverse_sqrt', '')]
  + [('wsd', s) for s in config_lib.COOLDOWN_SHAPES],
)
def test_every_schedule_follows_its_formula_at_every_step(schedule, shape):
  oc = _oc(schedule, cooldown_shape=shape or 'linear')
  lr = optim.schedule(oc, T)
  got = [float(lr(s)) for s in range(T)]
  np.testing.assert_allclose(got, [_formula(schedule, s, shape or 'linear') for s in range(T)], rtol=1e-6, atol=1e-7)


def test_the_stable_phase_of_wsd_is_exactly_lr_whatever_the_cooldown_and_the_run_length():
  # What branching rests on: the stable run (no cooldown, any length) and each branch (cooldown at its own end)
  # take bitwise the same learning rate at every step before the branch's cooldown begins.
  stable = optim.schedule(_oc('wsd', cooldown_steps=0), 1000)
  for cooldown, steps in ((10, 40), (20, 60), (30, 90)):
    branch = optim.schedule(_oc('wsd', cooldown_steps=cooldown), steps)
    for s in range(steps - cooldown):
      assert np.float32(branch(s)).tobytes() == np.float32(stable(s)).tobytes(), (cooldown, s)
    assert float(branch(steps - 1)) < LR


@pytest.mark.parametrize(
  'override,fragment',
  [
    ('optimizer.schedule=step', 'optimizer.schedule must be one of cosine, linear'),
    ('optimizer.cooldown_shape=exp', 'optimizer.cooldown_shape must be one of linear, cosine, 1-sqrt'),
    ('optimizer.cooldown_steps=-1', 'optimizer.cooldown_steps (-1) must be >= 0'),
  ],
)
def test_a_bad_schedule_setting_is_a_config_error_naming_it(override, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
    config_lib.load('configs/tiny.py', [override])


def test_a_wsd_cooldown_longer_than_the_run_is_refused_in_one_line(capsys):
  argv = ['schedule', '--config=configs/tiny.py', '--config.optimizer.schedule=wsd']
  assert cli.main(argv + ['--config.optimizer.cooldown_steps=55']) == 2  # + 10 warmup steps > 60
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax schedule: error: optimizer.cooldown_steps (55)') and 'fit in the 60 steps' in line
  # without a cooldown there is nothing to fit: a run shorter than its warmup is as valid as with cosine
  config_lib.load('configs/tiny.py', ['optimizer.schedule=wsd', 'train.steps=5'])


def test_lmjax_schedule_prints_the_curve_at_the_phase_boundaries_and_plots_it(tmp_path, capsys):
  argv = ['schedule', '--config=configs/tiny.py', '--config.optimizer.schedule=wsd', '--points=3']
  png = tmp_path / 'lr.png'
  assert cli.main(argv + ['--config.optimizer.cooldown_steps=20', f'--png={png}']) == 0
  printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith('step ')]
  # steps 0, 30 and 59 evenly, 10 (end of warmup) and 40 (start of the cooldown)
  assert [int(p[1]) for p in printed] == [0, 10, 30, 40, 59]
  assert [float(p[3]) for p in printed[:4]] == [0.0, 3e-3, 3e-3, 3e-3] and 3e-4 < float(printed[4][3]) < 3e-3
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------------------------- parameter groups


def _params(**kw):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from lmjax import model as model_lib  # pylint: disable=import-outside-toplevel

  cfg = model_lib.ModelConfig(vocab_size=11, max_len=8, n_layers=2, n_heads=2, d_model=8, **kw)
  params = model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  return nn.meta.unbox(params)


def _groups(params):
  import jax  # pylint: disable=import-outside-toplevel

  flat = jax.tree_util.tree_leaves_with_path(params)
  return {'/'.join(str(k.key) for k in p): optim.param_group(p) for p, _ in flat}


def test_every_parameter_is_in_the_group_its_role_says():
  gpt2 = _groups(_params())
  assert {k for k, g in gpt2.items() if g == 'embeddings'} == {'embed', 'pos_embed'}
  assert {k for k, g in gpt2.items() if g == 'norms'} == {'ln_f/scale', 'ln_f/bias'} | {
    f'block_{i}/{n}/{w}' for i in range(2) for n in ('ln1', 'ln2') for w in ('scale', 'bias')
  }
  assert {k for k, g in gpt2.items() if g == 'biases'} == {
    f'block_{i}/{m}_bias' for i in range(2) for m in ('attn/q', 'attn/kv', 'attn/o', 'mlp/up', 'mlp/down')
  }
  assert {k for k, g in gpt2.items() if g == 'attention'} == {
    f'block_{i}/attn/{w}_kernel' for i in range(2) for w in ('q', 'kv', 'o')
  }
  assert {k for k, g in gpt2.items() if g == 'mlp'} == {
    f'block_{i}/mlp/{w}_kernel' for i in range(2) for w in ('up', 'down')
  }
  llama = _groups(_params(norm='rmsnorm', mlp='swiglu', use_bias=False, tied_embeddings=False, qk_norm=True))
  assert llama['lm_head'] == 'head' and llama['block_1/mlp/gate_kernel'] == 'mlp'
  assert llama['block_0/attn/q_norm/scale'] == 'norms' and 'biases' not in llama.values()


def _one_update(oc, grads_of):
  """The update of one optimizer step from parameters `_params(...)` with gradients grads_of(params)."""
  import jax  # pylint: disable=import-outside-toplevel

  params = _params(tied_embeddings=False)
  tx, _ = optim.make(oc, 100)
  updates, _ = jax.jit(tx.update)(grads_of(params), tx.init(params), params)
  return params, updates


def test_a_learning_rate_multiplier_scales_its_group_and_nothing_else():
  import jax  # pylint: disable=import-outside-toplevel

  grads = lambda params: jax.tree.map(lambda p: 0.3 * p + 0.01, params)
  base = dict(schedule='constant', warmup_steps=0, grad_clip=0.0)
  _, plain = _one_update(_oc(**base), grads)
  _, scaled = _one_update(_oc(**base, lr_multipliers=(('head', 2.0), ('mlp', 0.0))), grads)
  for path, u in jax.tree_util.tree_leaves_with_path(scaled):
    want = jax.tree_util.tree_leaves_with_path(plain)
    p = dict((tuple(q), v) for q, v in want)[tuple(path)]
    factor = {'head': 2.0, 'mlp': 0.0}.get(optim.param_group(path), 1.0)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(p) * np.float32(factor))


def test_a_weight_decay_multiplier_sets_its_groups_decay_and_the_rest_keep_the_default_mask():
  # Zero gradients: AdamW's step is then the decoupled decay alone, -lr * rate * p, leaf by leaf.
  import jax  # pylint: disable=import-outside-toplevel

  oc = _oc(
    'constant', warmup_steps=0, grad_clip=0.0, weight_decay=0.1, wd_multipliers=(('attention', 0.5), ('norms', 1.0))
  )
  params, updates = _one_update(oc, lambda params: jax.tree.map(lambda p: 0 * p, params))
  rates = {'attention': 0.05, 'norms': 0.1, 'mlp': 0.1, 'head': 0.1, 'embeddings': 0.0, 'biases': 0.0}
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
    np.testing.assert_allclose(u, -LR * rates[optim.param_group(path)] * np.asarray(p), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  'override,fragment',
  [
    ("optimizer.lr_multipliers=(('embedding', 0.1),)", "unknown group 'embedding'; the groups are embeddings, norms"),
    ("optimizer.wd_multipliers=(('mlp', -1.0),)", "the multiplier of 'mlp' must be >= 0"),
    ("optimizer.lr_multipliers=(('mlp', 1.0), ('mlp', 2.0))", "names 'mlp' twice"),
    ('optimizer.lr_multipliers=0.1', 'expected tuple'),
    ("optimizer.lr_multipliers=('mlp', 0.1)", 'must be (GROUP, MULTIPLIER) pairs'),
  ],
)
def test_a_bad_multiplier_is_a_config_error_naming_it(override, fragment):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load('configs/tiny.py', [override])
  assert fragment in str(e.value)
  with pytest.raises(config_lib.ConfigError, match='wd_multipliers works with adamw and lion'):
    config_lib.load('configs/tiny.py', ["optimizer.wd_multipliers=(('mlp', 2.0),)", 'optimizer.name=adafactor'])


def test_a_group_that_matches_no_parameter_is_a_config_error_when_the_model_is_built():
  from lmjax import engine  # pylint: disable=import-outside-toplevel

  for variant, group in (('configs/tiny.py:llama', 'biases'), ('configs/tiny.py', 'head')):
    config = config_lib.load(
      variant, ['model.vocab_size=65', 'mesh.data=1', f"optimizer.lr_multipliers=(('{group}', 0.5),)"]
    )
    with pytest.raises(config_lib.ConfigError, match=f"names '{group}', which matches no parameter of this model"):
      engine.Engine(config)


def test_a_run_with_group_multipliers_trains_and_its_checkpoint_restores(tmp_path, shakespeare_dirs):
  from conftest import ONE_DEVICE, rows, train_tiny  # pylint: disable=import-outside-toplevel

  from lmjax import inference  # pylint: disable=import-outside-toplevel

  groups = (
    "optimizer.lr_multipliers=(('embeddings', 0.5), ('norms', 2.0))",
    "optimizer.wd_multipliers=(('mlp', 0.5),)",
  )
  train_tiny(
    tmp_path / 'run',
    shakespeare_dirs,
    *groups,
    'train.steps=10',
    'train.log_every=5',
    'train.eval_every=10',
    'train.checkpoint_every=10',
  )
  losses = [r['train_loss'] for r in rows(tmp_path / 'run') if 'train_loss' in r]
  assert losses[-1] < losses[0]
  assert int(inference.load_run(str(tmp_path / 'run'), ONE_DEVICE, params_only=False)[3].step) == 10
