"""Sweeps (lmjax/sweep.py): expansion into named members, validation of every member before any runs, a sweep
killed in its second member finishing on the same command without touching the first, SIGTERM, and the emitted
`lmjax train` lines and SLURM script running the same members."""

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_overrides

from lmjax import cli, results, sweep as sweep_lib, workdir as workdir_lib


def sweep_file(path, **fields) -> str:
  body = ''.join(f'    {k}={v!r},\n' for k, v in fields.items())
  path.write_text(f'from lmjax.sweep import Sweep\n\n\ndef get_sweep():\n  return Sweep(\n{body}  )\n')
  return str(path)


def lmjax(*args, **kw):
  return subprocess.Popen([sys.executable, '-m', 'lmjax', *args], cwd=REPO, text=True, **kw)


def signal_when(proc, started, sig, what: str) -> None:
  """Sends `sig` to a running sweep once `started()` holds (polled every 5 ms, for at most 300 s)."""
  deadline = time.time() + 300
  while not started():
    assert proc.poll() is None and time.time() < deadline, f'the {what} member did not start'
    time.sleep(0.005)
  proc.send_signal(sig)


def files(workdir) -> dict:
  """Every file under a workdir: its modification time and a hash of its bytes."""
  out = {}
  for d, _, names in os.walk(workdir):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, workdir)] = (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, 'rb').read()).hexdigest())
  return out


def rows_without_time(workdir):
  skip = ('time', 'tokens_per_sec', 'mfu', 'ms_per_step')
  return [{k: v for k, v in r.items() if k not in skip} for r in workdir_lib.read_metrics(str(workdir))]


# ---------------------------------------------------------------------------------------------- expansion


def test_product_and_list_expand_to_unique_names_that_are_the_same_on_every_load(tmp_path):
  path = sweep_file(
    tmp_path / 's.py',
    config='configs/tiny.py',
    overrides={'train.steps': 60},
    product={'model.norm': ('layernorm', 'rmsnorm'), 'model.positions': ('learned', 'rope')},
    variants=({'optimizer.lr': 1e-3}, {'optimizer.lr': 3e-3, 'model.dropout': 0.1}),
    seeds=(0, 1),
  )
  members = sweep_lib.expand(sweep_lib.load(path))
  assert len(members) == 2 * 2 * 2 * 2 and len({m.name for m in members}) == 16
  assert members[0].name == 'norm=layernorm,positions=learned,lr=0.001/seed=0'
  assert members[-1].name == 'norm=rmsnorm,positions=rope,lr=0.003,dropout=0.1/seed=1'
  assert members[-1].overrides == (
    'train.steps=60',
    'model.norm=rmsnorm',
    'model.positions=rope',
    'optimizer.lr=0.003',
    'model.dropout=0.1',
    'seed=1',
  )
  assert [m.name for m in sweep_lib.expand(sweep_lib.load(path))] == [m.name for m in members]
  assert members[-1].workdir('runs/x') == os.path.join(
    'runs/x', 'norm=rmsnorm,positions=rope,lr=0.003,dropout=0.1', 'seed=1'
  )

  only_list = sweep_lib.expand(sweep_lib.Sweep('configs/tiny.py', variants=({}, {'model.mlp': 'swiglu'})))
  assert [m.name for m in only_list] == ['base/seed=0', 'mlp=swiglu/seed=0']
  only_product = sweep_lib.expand(sweep_lib.Sweep('configs/tiny.py', product={'train.steps': (30, 60)}, seeds=(3,)))
  assert [m.name for m in only_product] == ['steps=30/seed=3', 'steps=60/seed=3']


def test_a_name_uses_each_keys_last_part_unless_two_keys_share_it_and_is_safe_as_a_directory():
  assert results.variant_name({'a.x': '1', 'b.x': '2', 'c.y': '3'}, ['a.x', 'b.x', 'c.y']) == 'a.x=1,b.x=2,y=3'
  s = sweep_lib.Sweep('configs/tiny.py', product={'train.eval_every': (30,), 'sample.stop': (('\n\n', 'a/b'),)})
  assert sweep_lib.expand(s)[0].variant == 'eval_every=30,stop=n+n+a+b'
  stages = {'data.mixture_schedule': ([[0, {'shakespeare': 0.7, 'code': 0.3}]], [[0, {'shakespeare': 0.9}]])}
  names = [m.variant for m in sweep_lib.expand(sweep_lib.Sweep('configs/tiny.py', product=stages))]
  assert names == ['mixture_schedule=0+shakespeare-0.7+code-0.3', 'mixture_schedule=0+shakespeare-0.9']


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  'fields, fragments',
  [
    (
      {'variants': ({'model.norm': 'rmsnorm'}, {'model.nrom': 'rmsnorm'})},
      ['1 of 2 members', 'member nrom=rmsnorm/seed=0:', "unknown config key 'model.nrom'", 'did you mean model.norm'],
    ),
    (
      {'product': {'train.steps': (60, 'many')}},
      ['member steps=many/seed=0:', "--config.train.steps='many': expected int"],
    ),
    (
      {'product': {'model.norm': ('layernorm', 'batchnorm')}, 'seeds': (0, 1)},
      ['2 of 4 members', 'member norm=batchnorm/seed=0, norm=batchnorm/seed=1:', 'model.norm must be one of'],
    ),
    ({'product': {'model.norm': ('layernorm',)}, 'baseline': 'norm=rmsnorm'}, ["Sweep.baseline 'norm=rmsnorm'"]),
    ({'product': {'seed': (0, 1)}}, ['use Sweep.seeds']),
    ({'metrics': ('val_los',)}, ["Sweep.metrics: unknown ['val_los']"]),
    ({'seed': (0, 1)}, ['get_sweep() failed: TypeError', "'seed'"]),
  ],
  ids=['unknown key', 'wrong type', 'bad value', 'baseline', 'seed swept', 'metric', 'sweep field'],
)
def test_a_bad_member_or_sweep_file_fails_the_whole_sweep_in_one_line_before_any_member_starts(
  fields, fragments, tmp_path, capsys
):
  path = sweep_file(tmp_path / 's.py', config='configs/tiny.py', **fields)
  assert cli.main(['sweep', path, f'--workdir={tmp_path / "run"}']) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax sweep: error: ')
  for f in fragments:
    assert f in line, (f, line)
  assert not (tmp_path / 'run').exists()  # nothing started, not even the valid members


def test_a_member_whose_workdir_recorded_another_config_is_refused(tmp_path, capsys):
  path = sweep_file(tmp_path / 's.py', config='configs/tiny.py', overrides={'optimizer.lr': 0.01})
  member = sweep_lib.expand(sweep_lib.load(path))[0]
  config = sweep_lib.check(sweep_lib.load(path), [member], str(tmp_path / 'run'))[member.name]
  with config.unlocked():
    config.optimizer.lr = 0.02
  os.makedirs(member.workdir(str(tmp_path / 'run')))
  workdir_lib.save_config(config, member.workdir(str(tmp_path / 'run')))
  assert cli.main(['sweep', path, f'--workdir={tmp_path / "run"}', '--dry-run']) == 2
  assert 'optimizer.lr: recorded 0.02, now 0.01' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- running


@pytest.fixture(scope='module')
def two_members(tmp_path_factory, shakespeare_dirs, cache_dir):
  """A sweep file of two tiny members: norm=rmsnorm, then norm=layernorm (configs/tiny.py as it is)."""
  common = dict(o.split('=', 1) for o in tiny_overrides(*shakespeare_dirs))
  common |= {'mesh.data': 1, 'train.checkpoint_every': 10, 'train.compilation_cache_dir': cache_dir}
  return sweep_file(
    tmp_path_factory.mktemp('sweep') / 'two.py',
    config='configs/tiny.py',
    overrides=common,
    product={'model.norm': ('rmsnorm', 'layernorm')},
    baseline='norm=layernorm',
  )


@pytest.fixture(scope='module')
def killed_and_rerun(two_members, tmp_path_factory):
  """The sweep through the real CLI, killed with -9 once its second member saved its first checkpoint; then the
  same command again. Returns what was seen."""
  root = tmp_path_factory.mktemp('killed') / 'run'
  first, second = (m.workdir(str(root)) for m in sweep_lib.expand(sweep_lib.load(two_members)))
  proc = lmjax('sweep', two_members, f'--workdir={root}', stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    signal_when(proc, lambda: workdir_lib.saved_steps(second), signal.SIGKILL, 'second')
  finally:
    proc.wait(timeout=60)
  seen = {'first': first, 'second': second, 'root': root, 'at_kill': workdir_lib.saved_steps(second)}
  seen['first_files'] = files(first)
  rerun = lmjax('sweep', two_members, f'--workdir={root}', stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seen['out'], _ = rerun.communicate(timeout=300)
  seen['rc'] = rerun.returncode
  return seen


def test_a_sweep_killed_in_its_second_member_finishes_on_the_same_command_and_the_first_is_untouched(
  killed_and_rerun, trained
):
  seen = killed_and_rerun
  assert seen['rc'] == 0, seen['out'][-3000:]
  assert 60 in workdir_lib.saved_steps(seen['first']) and 60 not in seen['at_kill']
  assert '[1/2] norm=rmsnorm/seed=0: finished' in seen['out']
  assert f'[2/2] norm=layernorm/seed=0: at step {seen["at_kill"][-1]}' in seen['out']
  assert files(seen['first']) == seen['first_files']  # not one byte or mtime changed
  assert 60 in workdir_lib.saved_steps(seen['second'])
  assert rows_without_time(seen['second']) == rows_without_time(trained)  # = configs/tiny.py uninterrupted
  assert (seen['root'] / 'results.md').read_text().count('`norm=') >= 2


def test_an_emitted_train_line_trains_the_same_member_as_the_sweep(killed_and_rerun, two_members, tmp_path, capsys):
  elsewhere = tmp_path / 'emitted'
  assert cli.main(['sweep', two_members, f'--workdir={elsewhere}', '--emit=commands', '--only=norm=rmsnorm*']) == 0
  [line] = capsys.readouterr().out.splitlines()
  argv = shlex.split(line)
  assert argv[:3] == ['lmjax', 'train', '--config=configs/tiny.py'] and not elsewhere.exists()
  subprocess.run([sys.executable, '-m', 'lmjax', *argv[1:]], cwd=REPO, check=True, capture_output=True, timeout=300)
  by_sweep, by_line = killed_and_rerun['first'], elsewhere / 'norm=rmsnorm' / 'seed=0'
  assert (by_line / 'config.json').read_text() == open(os.path.join(by_sweep, 'config.json')).read()
  assert rows_without_time(by_line) == rows_without_time(by_sweep)


def test_dry_run_lists_each_members_state_and_only_selects_by_glob(killed_and_rerun, two_members, capsys):
  root = killed_and_rerun['root']
  assert cli.main(['sweep', two_members, f'--workdir={root}', '--dry-run']) == 0
  out = capsys.readouterr().out
  assert 'norm=rmsnorm/seed=0' in out and 'model.norm=layernorm seed=0' in out and out.count('finished') == 2
  assert cli.main(['sweep', two_members, f'--workdir={root}', '--dry-run', '--only=*layer*']) == 0
  assert '1 of 2 members' in capsys.readouterr().out
  assert cli.main(['sweep', two_members, f'--workdir={root}', '--only=*batchnorm*']) == 2
  assert "--only='*batchnorm*' matches no member" in capsys.readouterr().err


def test_the_slurm_script_runs_one_members_train_line_per_array_task(two_members, tmp_path, capsys):
  root = tmp_path / 'run'
  assert cli.main(['sweep', two_members, f'--workdir={root}', '--emit=commands']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert cli.main(['sweep', two_members, f'--workdir={root}', '--emit=slurm']) == 0
  script = (root / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-1' in script
  assert [f'  {i}) {line} ;;' for i, line in enumerate(lines)] == [l for l in script.splitlines() if ') lmjax' in l]
  assert subprocess.run(['bash', '-n', str(root / 'sweep.sbatch')]).returncode == 0
  assert sorted(os.listdir(root)) == ['sweep.sbatch']  # nothing trained


def test_sigterm_stops_the_sweep_with_exit_143_after_the_running_member_checkpoints(two_members, tmp_path):
  root = tmp_path / 'run'
  first, second = (m.workdir(str(root)) for m in sweep_lib.expand(sweep_lib.load(two_members)))
  proc = lmjax('sweep', two_members, f'--workdir={root}', stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    signal_when(proc, lambda: workdir_lib.read_metrics(first), signal.SIGTERM, 'first')
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143, out[-3000:]
  assert 'norm=rmsnorm/seed=0 saved a checkpoint' in out
  assert 0 < workdir_lib.saved_steps(first)[-1] < 60 and not os.path.exists(second)


def test_a_member_that_fails_is_reported_and_the_sweep_goes_on_with_the_next(tmp_path, capsys, no_network):
  missing = [str(tmp_path / 'a'), str(tmp_path / 'b')]  # no input.txt in either: each member fails at its data
  path = sweep_file(
    tmp_path / 's.py',
    config='configs/tiny.py',
    overrides={'data.data_dir': str(tmp_path / 'tfds')},
    product={'data.manual_dir': missing},
  )
  assert cli.main(['sweep', path, f'--workdir={tmp_path / "run"}']) == cli.EXIT_MEMBERS_FAILED
  out, err = capsys.readouterr()
  assert '[1/2]' in out and '[2/2]' in out and 'no results yet' in out
  failed = [l for l in err.splitlines() if l.startswith('lmjax sweep: ') and ' failed: ' in l]
  assert len(failed) == 3 and all('input.txt' in l for l in failed[:2]), err  # two members, then the summary
