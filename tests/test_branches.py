"""train.branch_from: a new workdir continues another run's exact state at a step, with a schedule of its own."""

import shutil

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE, rows, tiny_overrides, train_tiny

from lmjax import checkpoint, cli, inference, workdir as workdir_lib

WSD = ('optimizer.schedule=wsd', 'train.log_every=5', 'train.eval_every=0')


def _state(workdir):
  return jax.tree.leaves(inference.load_run(str(workdir), ONE_DEVICE, params_only=False)[3])


def _losses(workdir):
  return {r['step']: r['train_loss'] for r in rows(workdir) if 'train_loss' in r}


def test_a_cooldown_branched_from_a_stable_run_equals_the_straight_run_bitwise(tmp_path, shakespeare_dirs, cache_dir):
  # The stable run never decays (cooldown 0) and saves step 20; the straight run decays over steps 20..30 itself.
  stable, straight, branch = tmp_path / 'stable', tmp_path / 'straight', tmp_path / 'branch'
  train_tiny(stable, shakespeare_dirs, *WSD, 'train.steps=40', 'train.checkpoint_every=20', cache=cache_dir)
  cooldown = ('optimizer.cooldown_steps=10', 'optimizer.cooldown_shape=1-sqrt', 'optimizer.decay_steps=30')
  train_tiny(straight, shakespeare_dirs, *WSD, *cooldown, 'train.steps=30', cache=cache_dir)
  # The branch stops at 25 (its schedule still ends at 30, optimizer.decay_steps), and resumes to 30 after its
  # source is gone: a branch, once started, is a run of its own.
  at_20 = (f'train.branch_from={stable}:20', 'train.checkpoint_every=5')
  train_tiny(branch, shakespeare_dirs, *WSD, *cooldown, *at_20, 'train.steps=25', cache=cache_dir)
  shutil.rmtree(stable)
  train_tiny(branch, shakespeare_dirs, *WSD, *cooldown, *at_20, 'train.steps=30', cache=cache_dir)
  want, got = _losses(straight), _losses(branch)
  assert sorted(got) == [25, 30] and [got[s] for s in (25, 30)] == [want[s] for s in (25, 30)]
  for x, y in zip(_state(straight), _state(branch), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  first, resumed = workdir_lib.read_provenance(str(branch))
  assert first['branched_from'] == {'workdir': str(stable), 'step': 20} and 'branched_from' not in resumed
  meta = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(str(branch)), data_iterator=False)
  try:
    assert meta.read_meta(30)['branched_from'] == {'workdir': str(stable), 'step': 20}
  finally:
    meta.close()


@pytest.fixture(scope='module')
def source(tmp_path_factory, shakespeare_dirs, cache_dir):
  workdir = tmp_path_factory.mktemp('source')
  train_tiny(workdir, shakespeare_dirs, *WSD, 'train.steps=20', 'train.checkpoint_every=10', cache=cache_dir)
  return str(workdir)


@pytest.mark.parametrize(
  'change,fragment',
  [
    (('seed=1',), 'this config differs from it: seed 0 there, 1 here'),
    (('optimizer.name=lion',), "optimizer.name 'adamw' there, 'lion' here"),
    (('optimizer.grad_clip=0',), 'optimizer.grad_clip on there, off here'),
    (('train.batch_size=4',), 'train.batch_size 8 there, 4 here'),
    (('model.d_model=64',), 'model.d_model: checkpoint 32 vs run 64'),
    (('train.steps=10',), 'starts at step 10, and train.steps (10) ends the run there'),
    (('train.branch_from=SOURCE:15',), 'keeps no checkpoint of step 15 (it keeps 10, 20)'),
    (('train.branch_from=SOURCE',), 'train.branch_from must be WORKDIR:STEP'),
    (('train.branch_from=SOURCE/absent:10',), 'is not a directory; give WORKDIR:STEP, the --workdir of a run'),
    (
      ('train.steps_per_call=4', 'train.steps=32', 'train.log_every=4', 'train.checkpoint_every=4'),
      'not a multiple of train.steps_per_call (4)',
    ),
    (('train.init_from=SOURCE',), 'train.branch_from and train.init_from both'),
  ],
)
def test_a_branch_that_cannot_continue_its_source_is_one_line_and_writes_nothing(
  change, fragment, source, shakespeare_dirs, tmp_path, capsys
):
  branch = tmp_path / 'branch'
  extra = [f'train.branch_from={source}:10', 'train.steps=30', *WSD, *(c.replace('SOURCE', source) for c in change)]
  argv = ['train', '--config=configs/tiny.py', f'--workdir={branch}']
  assert cli.main(argv + [f'--config.{o}' for o in tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + extra]) == 2
  [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith('lmjax train: error: ')]
  assert fragment in line, line
  assert not (branch / 'checkpoints').exists() or not any((branch / 'checkpoints').iterdir())
  assert not (branch / 'config.json').exists()


def _branch_sweep(path, dirs, stable, branches, seeds=(0,)):
  common = dict(item.split('=', 1) for item in tiny_overrides(*dirs) + ONE_DEVICE + list(WSD))
  path.write_text(
    'from lmjax.sweep import BranchFrom, Sweep\n\n'
    f'STABLE = {stable!r}\n\n\ndef get_sweep():\n'
    f'  branches = tuple({{**b, "train.branch_from": BranchFrom(STABLE, s)}} for b, s in {branches!r})\n'
    f'  return Sweep(config="configs/tiny.py", overrides={common!r}, variants=(STABLE, *branches), seeds={seeds!r})\n'
  )
  return str(path)


def test_a_sweep_branches_each_seed_from_its_own_stable_member(tmp_path, shakespeare_dirs, capsys):
  stable = {'optimizer.cooldown_steps': 0, 'train.steps': 20, 'train.checkpoint_every': 10}
  branches = [({'optimizer.cooldown_steps': c, 'train.steps': 10 + c}, 10) for c in (10, 20)] + [
    ({'optimizer.cooldown_steps': 10, 'train.steps': 30}, 20)
  ]
  path = _branch_sweep(tmp_path / 'cooldowns.py', shakespeare_dirs, stable, branches, seeds=(0, 1))
  root = tmp_path / 'runs'
  assert cli.main(['sweep', path, f'--workdir={root}', '--only=*/seed=1', '--emit=commands']) == 0
  lines = capsys.readouterr().out.strip().splitlines()  # the emitted lines branch from the workdir of the same seed
  stable_name = 'cooldown_steps=0,steps=20,checkpoint_every=10'
  assert lines[1].endswith(f'--config.train.branch_from={root / stable_name / "seed=1"}:10 --config.seed=1')
  assert cli.main(['sweep', path, f'--workdir={root}', '--only=*/seed=0']) == 0
  for name, step in (
    ('cooldown_steps=10,steps=20,branch_from=10', 10),
    ('cooldown_steps=10,steps=30,branch_from=20', 20),
  ):
    [entry] = workdir_lib.read_provenance(str(root / name / 'seed=0'))
    assert entry['branched_from'] == {'workdir': str(root / stable_name / 'seed=0'), 'step': step}
    assert _losses(root / name / 'seed=0')  # it trained
  # The results name a branch's source variant, not seed 0's path (each seed branches from its own member).
  assert cli.main(['compare', str(root), f'--out={tmp_path / "results"}']) == 0
  md = (tmp_path / 'results' / 'results.md').read_text()
  assert f"train.branch_from: '' → '{stable_name}/seed=*:20'" in md and str(root) not in md.split('## Provenance')[0]


@pytest.mark.parametrize(
  'stable_step,branch_first,fragment',
  [(None, False, 'names no variant'), (20, True, 'which is listed after it: list sources first')],
)
def test_a_sweep_branch_whose_source_is_missing_or_later_is_refused_in_one_line(
  stable_step, branch_first, fragment, tmp_path, shakespeare_dirs, capsys
):
  stable = {'optimizer.cooldown_steps': 0, 'train.steps': 20}
  source = stable if stable_step else {'optimizer.cooldown_steps': 0, 'train.steps': 99}
  common = dict(item.split('=', 1) for item in tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + list(WSD))
  branch = {'optimizer.cooldown_steps': 10, 'train.steps': 30}
  order = '(BRANCH, STABLE)' if branch_first else '(STABLE, BRANCH)'
  (tmp_path / 's.py').write_text(
    'from lmjax.sweep import BranchFrom, Sweep\n\n'
    f'STABLE = {stable!r}\nBRANCH = {{**{branch!r}, "train.branch_from": BranchFrom({source!r}, 10)}}\n\n\n'
    f'def get_sweep():\n  return Sweep(config="configs/tiny.py", overrides={common!r}, variants={order})\n'
  )
  assert cli.main(['sweep', str(tmp_path / 's.py'), f'--workdir={tmp_path / "runs"}', '--dry-run']) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax sweep: error: ') and fragment in line


def test_a_refused_branch_can_start_again_in_the_same_workdir(source, shakespeare_dirs, tmp_path, capsys):
  branch = tmp_path / 'branch'
  argv = ['train', '--config=configs/tiny.py', f'--workdir={branch}']
  extra = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + [f'train.branch_from={source}:10', 'train.steps=20', *WSD]
  assert cli.main(argv + [f'--config.{o}' for o in extra + ['seed=1']]) == 2
  assert cli.main(argv + [f'--config.{o}' for o in extra]) == 0
  assert sorted(_losses(branch)) == [15, 20] and 'branched from' in capsys.readouterr().out
