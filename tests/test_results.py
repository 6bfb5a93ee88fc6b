"""Results (lmjax/results.py): seed statistics and Welch's test against a hand computation, verdicts, plots,
`lmjax compare` grouping runs that differ only by seed, and wall-clock seconds across a resume."""

import csv
import datetime
import json
import math

import numpy as np
import pytest
from conftest import ONE_DEVICE
from scipy import special

from lmjax import cli, config as config_lib, inference, model as model_lib, results, workdir as workdir_lib

T0 = 1_800_000_000.0  # the fixture runs' first start, seconds since the epoch


def fake_run(workdir, seed, final_loss, *overrides, tokens_per_sec=1000.0, starts=(T0,)):
  """A workdir as configs/tiny.py training would leave it, with metrics written by hand: train rows every 10
  steps, evaluations at 30 (final_loss + 0.5) and 60 (final_loss), one provenance entry per start."""
  config = config_lib.load('configs/tiny.py', [*overrides, f'seed={seed}'])
  with config.unlocked():
    config.model.vocab_size = 65
  workdir.mkdir(parents=True)
  workdir_lib.save_config(config, str(workdir))
  lines = []
  for step in range(10, 70, 10):
    lines.append({'step': step, 'time': T0 + step, 'train_loss': 3.0, 'tokens_per_sec': tokens_per_sec})
    if step in (30, 60):
      loss = final_loss + (0.5 if step == 30 else 0.0)
      lines.append({'step': step, 'time': T0 + step + 1, 'val_loss': loss, 'val_bpb': loss / math.log(2)})
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  (workdir / 'provenance.json').write_text(
    json.dumps([{'time': _iso(t), 'git_commit': 'abc1234def', 'git_dirty': False} for t in starts])
  )
  return str(workdir)


def _iso(t):
  return datetime.datetime.fromtimestamp(t).isoformat(timespec='seconds')  # local time, as provenance.json has it


BASE = (2.00, 2.02, 2.04)
BETTER = (1.95, 1.96, 1.99)
SAME = (2.01, 2.05, 2.00)


@pytest.fixture(scope='module')
def three_variants(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  for name, losses, norm in (('base', BASE, 'layernorm'), ('better', BETTER, 'rmsnorm'), ('same', SAME, 'layernorm')):
    extra = ['optimizer.lr=0.001'] if name == 'same' else []
    for seed, loss in enumerate(losses):
      fake_run(root / name / str(seed), seed, loss, f'model.norm={norm}', *extra)
  return root


def hand_welch_p(a, b):
  """Welch's t and Welch-Satterthwaite degrees of freedom; the two-sided p from Student's t distribution, written
  as the regularized incomplete beta function it is."""
  ma, mb = sum(a) / len(a), sum(b) / len(b)
  va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
  vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
  se2 = va / len(a) + vb / len(b)
  t = (ma - mb) / math.sqrt(se2)
  df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
  return float(special.betainc(df / 2, 0.5, df / (df + t * t)))


def test_mean_std_and_welch_p_match_a_hand_computation(three_variants, tmp_path, capsys):
  out = tmp_path / 'out'
  args = ['compare', str(three_variants), f'--out={out}', f'--baseline={three_variants / "base" / "1"}']
  assert cli.main(args + ['--metrics=val_loss,val_bpb']) == 0
  table = {r['variant']: r for r in csv.DictReader(open(out / 'results.csv'))}
  assert list(table) == ['norm=layernorm,lr=0.003', 'norm=rmsnorm,lr=0.003', 'norm=layernorm,lr=0.001']
  base, better, same = table.values()
  for row, losses in ((base, BASE), (better, BETTER), (same, SAME)):
    mean = sum(losses) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2)
    assert float(row['val_loss_mean']) == pytest.approx(mean, rel=1e-5)
    assert float(row['val_loss_std']) == pytest.approx(std, rel=1e-5)
    assert float(row['best_val_loss_mean']) == pytest.approx(mean, rel=1e-5)  # the last evaluation is the best
    assert float(row['val_bpb_mean']) == pytest.approx(mean / math.log(2), rel=1e-5)
    assert row['seeds'] == '3' and row['steps_mean'] == '60' and float(row['tokens_per_sec_mean']) == 1000
  p_better, p_same = hand_welch_p(BETTER, BASE), hand_welch_p(SAME, BASE)
  assert p_better < 0.05 < p_same  # the fixture's two cases
  assert float(better['val_loss_p']) == pytest.approx(p_better, rel=1e-5)
  assert float(same['val_loss_p']) == pytest.approx(p_same, rel=1e-5)
  assert float(better['val_loss_diff']) == pytest.approx(sum(BETTER) / 3 - sum(BASE) / 3, rel=1e-5)
  assert better['val_loss_verdict'] == f'better, p = {p_better:.2g}'
  assert same['val_loss_verdict'] == f'within seed noise (p = {p_same:.2g})'
  assert base['val_loss_verdict'] == 'baseline' and better['config_diff'] == "model.norm='rmsnorm'"
  md = (out / 'results.md').read_text()
  assert '| `norm=layernorm,lr=0.003` (baseline) | 3 | 2.0200 ± 0.0200 |' in md
  assert '- `norm=layernorm,lr=0.001`: optimizer.lr: 0.003 → 0.001' in md
  assert '- commit: abc1234 (clean tree) (every run)' in md
  assert md in capsys.readouterr().out


def test_verdicts_follow_which_way_is_better_and_need_two_seeds():
  assert results.verdict('val_loss', -0.1, 0.001, 0.05, (3, 3)) == 'better, p = 0.001'
  assert results.verdict('val_loss', +0.1, 0.001, 0.05, (3, 3)) == 'worse, p = 0.001'
  assert results.verdict('tokens_per_sec', +10.0, 0.001, 0.05, (3, 3)) == 'better, p = 0.001'
  assert results.verdict('val_loss', -0.1, 0.2, 0.05, (3, 3)) == 'within seed noise (p = 0.2)'
  assert results.verdict('val_loss', -0.1, 0.03, 0.01, (3, 3)) == 'within seed noise (p = 0.03)'
  assert results.verdict('val_loss', -0.1, None, 0.05, (1, 3)) == 'no test: one seed'
  assert results.welch([1.0], [2.0, 3.0]) is None and results.welch([1.0, 1.0], [1.0, 1.0]) is None
  assert results.stats([2.0]) == {'mean': 2.0, 'std': results.stats([2.0])['std'], 'n': 1}
  assert math.isnan(results.stats([2.0])['std'])


def test_plots_are_written_non_empty_and_drawn(three_variants, tmp_path):
  from matplotlib import image

  runs = results.group_by_seed(results.find_runs([three_variants]))
  paths = results.write(str(tmp_path), runs, baseline=next(iter(runs)))
  pngs = [p for p in paths if p.endswith('.png')]
  assert [p.rsplit('/', 1)[1] for p in pngs] == [f'val_loss_vs_{x}.png' for x in ('step', 'tokens', 'seconds')]
  for p in pngs:
    assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    pixels = image.imread(p)
    assert pixels.shape[0] > 200 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50


def test_compare_groups_runs_that_differ_only_by_seed_or_by_where_their_files_were(tmp_path, capsys):
  fake_run(tmp_path / 'a0', 0, 2.0)
  fake_run(tmp_path / 'a1', 1, 2.1, 'data.manual_dir=/elsewhere', 'train.progress_bar=false')  # another machine
  fake_run(tmp_path / 'b0', 0, 2.0, 'model.positions=rope')
  fake_run(tmp_path / 'c0', 0, 2.0, 'train.steps=30')
  fake_run(tmp_path / 'c1', 1, 2.0, 'train.steps=30')  # the same seed as a1, another config: another group
  groups = results.group_by_seed(results.find_runs([tmp_path / 'a1', tmp_path / 'a0', tmp_path / 'b0', tmp_path]))
  got = {name: sorted(r.workdir.rsplit('/', 1)[1] for r in rs) for name, rs in groups.items()}
  assert got == {
    'positions=learned,steps=60': ['a0', 'a1'],
    'positions=rope,steps=60': ['b0'],
    'positions=learned,steps=30': ['c0', 'c1'],
  }
  fake_run(tmp_path / 'd0', 0, 1.0, 'train.steps=120')  # its metrics stop at step 60: not finished, left out
  assert cli.main(['compare', str(tmp_path / 'a0'), str(tmp_path / 'd0'), f'--out={tmp_path / "out"}']) == 0
  out = capsys.readouterr().out
  assert '| `base` (baseline) | 1 | 2.0000 |' in out and f'Not finished, so not included: {tmp_path / "d0"}.' in out
  assert cli.main(['compare', str(tmp_path / 'nothing'), f'--out={tmp_path / "out"}']) == 2
  assert 'is not a directory' in capsys.readouterr().err


def test_wall_seconds_leave_out_the_time_a_run_was_down_before_its_resume(tmp_path):
  wd = tmp_path / 'run'
  fake_run(wd, 0, 2.0)
  # Rows at T0+10 ... T0+61; a second start 1000 s later: rows after it are timed from it, on top of the first part.
  lines = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  for r in lines:
    if r['step'] > 30:
      r['time'] += 1000
  (wd / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  starts = [T0, T0 + 1031]
  (wd / 'provenance.json').write_text(json.dumps([{'time': _iso(t)} for t in starts]))
  run = results.read_run(str(wd))
  first_part = 31.0  # T0 -> the last row before the resume (the eval at step 30)
  want = [r['time'] - T0 if r['time'] < starts[1] else first_part + r['time'] - starts[1] for r in lines]
  assert run.seconds() == pytest.approx(want)
  assert run.summary()['wall_s'] == pytest.approx(first_part + T0 + 1061 - starts[1])


def test_a_real_workdir_reads_back_its_steps_losses_and_parameter_count(trained):
  run = results.read_run(trained)
  evals = [r for r in workdir_lib.read_metrics(trained) if 'val_loss' in r]
  s = run.summary()
  assert s['steps'] == 60 and s['val_loss'] == evals[-1]['val_loss'] and s['val_bpb'] == evals[-1]['val_bpb']
  assert s['best_val_loss'] == min(r['val_loss'] for r in evals) and s['wall_s'] > 0 and s['tokens_per_sec'] > 0
  params = inference.load_run(trained, ONE_DEVICE)[-1].params
  assert s['params'] == model_lib.count_params(params)
  assert run.curve()['tokens'] == [r['step'] * 8 * 32 for r in evals]  # batch 8 x length 32
