"""What finished runs say, side by side: the one reader of workdirs for comparisons, seed statistics, Welch's test
against a baseline, and the table (CSV, markdown) and plots that `lmjax sweep` and `lmjax compare` write.

A variant is a group of runs that differ only by seed. Its numbers are the mean ± sample standard deviation (ddof
1) over its seeds; a difference from the baseline is "better" or "worse" only when Welch's t-test (unequal
variances, scipy.stats.ttest_ind) gives p < alpha, else it is "within seed noise"; one seed allows no test.
Plots: val loss against steps, tokens and wall-clock seconds, a line per variant (the mean over seeds) with a band
from the lowest to the highest seed.

Imports nothing heavy at module level (scipy, matplotlib and JAX load when used), so the CLI stays quick.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import re
import statistics

from lmjax import config as config_lib, workdir as workdir_lib
from lmjax.errors import WorkdirError

# The per-run results a table shows: name -> (column label, which way is better: -1 lower, +1 higher, 0 neither,
# format). Every val_* figure is over the whole eval split (or train.eval_max_batches), as the run logged it.
SUMMARIES = {
  'val_loss': ('final val loss', -1, '.4f'),
  'best_val_loss': ('best val loss', -1, '.4f'),
  'val_bpb': ('final val bits/byte', -1, '.4f'),
  'tokens_per_sec': ('tokens/s', +1, ',.0f'),
  'params': ('params', 0, ',.0f'),
  'wall_s': ('wall s', -1, ',.0f'),
  'steps': ('steps', 0, '.0f'),
}
# Fields that say where files are or how progress is shown, not what is computed: runs that differ only in these
# (and the seed) are one variant, e.g. the same config trained on two machines.
PLACE_FIELDS = (
  'data.manual_dir',
  'data.data_dir',
  'data.tokenizer_dir',
  'train.compilation_cache_dir',
  'train.progress_bar',
  'train.profile_steps',
)
PLOTS = {'step': 'step', 'tokens': 'tokens seen', 'seconds': 'wall-clock seconds'}
# Evaluation tasks (train.eval_tasks, lmjax/evals) log NAME/METRIC; a run's last value of each is a column too, and
# which way is better follows the METRIC part.
TASK_BETTER = {'acc': 1, 'acc_norm': 1, 'exact_match': 1, 'bleu': 1, 'rouge_l': 1, 'loss': -1, 'ppl': -1, 'bpb': -1}
TASK_BETTER.update({f'distinct_{n}': 1 for n in (1, 2, 3)})
# A data mixture (data.sources) logs these per source as METRIC/NAME (lmjax/actions.py Evaluate).
SOURCE_METRICS = ('val_loss', 'val_ppl', 'val_bpb')


def is_known(metric: str) -> bool:
  """A summary of SUMMARIES, or an evaluation task's NAME/METRIC."""
  return metric in SUMMARIES or '/' in metric


def unknown_metrics(metrics, where: str) -> str:
  """'' when every metric is known, else the message naming the unknown ones and what to choose from."""
  unknown = [m for m in metrics if not is_known(m)]
  return (
    f"{where}: unknown {unknown}; choose from {', '.join(SUMMARIES)} or an eval task's NAME/METRIC" if unknown else ''
  )


def plain(config) -> dict:
  """A config as JSON gives it back (tuples as lists): how recorded configs read, so the two compare equal."""
  return json.loads(json.dumps(config.to_dict()))


def column(metric: str) -> tuple:
  """(label, which way is better, format) of a summary or of an evaluation task's NAME/METRIC."""
  if metric in SUMMARIES:
    return SUMMARIES[metric]
  head, _, source = metric.partition('/')
  if head in SOURCE_METRICS:  # a mixture's source, evaluated alone (val_loss/NAME): lower is better
    return (f'final {head} {source}', -1, '.4f')
  return (f'final {metric}', TASK_BETTER.get(metric.rsplit('/', 1)[-1], 0), '.4f')


# ---------------------------------------------------------------------------------------------- reading runs


@dataclasses.dataclass
class Run:
  """A workdir as recorded: its resolved config (a dict), metrics rows and provenance entries."""

  workdir: str
  config: dict
  rows: list
  provenance: list

  @property
  def seed(self) -> int:
    return self.config['seed']

  @property
  def evals(self) -> list[dict]:
    """The rows of evaluations that produced a val_loss."""
    return [r for r in self.rows if r.get('val_loss') is not None]

  def seconds(self) -> list[float]:
    """Wall-clock seconds of training at each row, summed over the run's starts (provenance.json), so the time a
    killed run spent down before it was resumed is not counted; the steps it redid after its checkpoint are.
    Counted from each start's record (taken after the config's checks, before compiling); whole seconds."""
    starts = sorted(_epoch(p.get('time')) for p in self.provenance if _epoch(p.get('time')) is not None)
    if not starts or not self.rows or starts[0] > self.rows[0]['time'] + 1:  # no usable record: from the first row
      starts = [self.rows[0]['time']] if self.rows else []
    out, offset, segment, seg_end = [], 0.0, 0, None
    for r in self.rows:
      t = r['time']
      while segment + 1 < len(starts) and starts[segment + 1] <= t:
        offset += (seg_end - starts[segment]) if seg_end is not None else 0.0
        segment, seg_end = segment + 1, None
      out.append(offset + t - starts[segment])
      seg_end = t
    return out

  @property
  def finished(self) -> bool:
    """Its metrics reach train.steps (what the metrics say, so runs copied without checkpoints count too)."""
    return bool(self.rows) and self.rows[-1]['step'] >= self.config['train']['steps']

  def summary(self) -> dict:
    evals = self.evals
    speed = [r['tokens_per_sec'] for r in self.rows if r.get('tokens_per_sec') is not None]
    nan = math.nan
    tasks = {}
    for r in self.rows:  # the last value of each evaluation task's NAME/METRIC
      tasks.update({k: v for k, v in r.items() if '/' in k and isinstance(v, (int, float))})
    return {
      **tasks,
      'val_loss': evals[-1]['val_loss'] if evals else nan,
      'best_val_loss': min(r['val_loss'] for r in evals) if evals else nan,
      'val_bpb': _or_nan(evals[-1].get('val_bpb')) if evals else nan,
      'tokens_per_sec': statistics.median(speed) if speed else nan,  # the median log window: robust to a slow one
      'params': n_params(self.config),
      'wall_s': self.seconds()[-1] if self.rows else nan,
      'steps': self.rows[-1]['step'] if self.rows else 0,
    }

  def curve(self) -> dict:
    """{'step' | 'tokens' | 'seconds' | 'val_loss': one value per evaluation}."""
    seconds = dict(zip(map(id, self.rows), self.seconds()))
    evals = self.evals
    tokens_per_step = self.config['train']['batch_size'] * self.config['model']['max_len']
    return {
      'step': [r['step'] for r in evals],
      'tokens': [r['step'] * tokens_per_step for r in evals],
      'seconds': [seconds[id(r)] for r in evals],
      'val_loss': [r['val_loss'] for r in evals],
    }


def read_run(workdir: str) -> Run:
  """The one reader of a workdir's recorded results (lmjax/workdir.py knows the files)."""
  config = workdir_lib.load_config(workdir)
  rows = workdir_lib.read_metrics(workdir)
  for i, r in enumerate(rows):
    bad = [k for k in ('step', 'time') if not _number(r.get(k))]
    bad += [k for k in ('val_loss', 'val_bpb', 'tokens_per_sec') if r.get(k) is not None and not _number(r[k])]
    if bad:
      raise WorkdirError(
        f'{workdir_lib.metrics_path(workdir)} line {i + 1}: {", ".join(bad)} must be numbers, got '
        f'{ {k: r.get(k) for k in bad} }; the file is damaged'
      )
  return Run(str(workdir), plain(config), rows, workdir_lib.read_provenance(workdir))


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def find_runs(paths) -> list[Run]:
  """Each path is a workdir (it holds config.json) or a folder searched for workdirs, in sorted order."""
  found = []
  for path in map(os.path.normpath, map(str, paths)):
    if not os.path.isdir(path):
      raise WorkdirError(f'{path} is not a directory; give workdirs of `lmjax train` runs, or folders holding them')
    if os.path.exists(os.path.join(path, workdir_lib.CONFIG)):
      found.append(path)
      continue
    inside = sorted(d for d, _, files in os.walk(path) if workdir_lib.CONFIG in files)
    if not inside:
      raise WorkdirError(f'{path} holds no workdir (no {workdir_lib.CONFIG} in it or below)')
    found += inside
  return [read_run(p) for p in dict.fromkeys(found)]


def _epoch(iso) -> float | None:
  try:
    return datetime.datetime.fromisoformat(iso).timestamp()
  except (TypeError, ValueError):
    return None


def _or_nan(x):
  return math.nan if x is None else x


_PARAMS = {}


def n_params(config: dict) -> int | float:
  """Parameters of the run's model, from shapes alone (jax.eval_shape; nothing is allocated)."""
  key = json.dumps(config['model'], sort_keys=True)
  if key not in _PARAMS:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import linen as nn  # pylint: disable=import-outside-toplevel
    from lmjax import model as model_lib  # pylint: disable=import-outside-toplevel

    try:
      cfg = config_lib.model_config(config_lib.from_dict(config))
    except config_lib.ConfigError:
      return math.nan
    init = lambda t: model_lib.Transformer(cfg).init({'params': jax.random.key(0)}, t)['params']
    shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((1, cfg.max_len), jnp.int32))
    _PARAMS[key] = model_lib.count_params(nn.meta.unbox(shapes))
  return _PARAMS[key]


# ---------------------------------------------------------------------------------------------- grouping, naming


def flat(d: dict, prefix: str = '') -> dict:
  """{'model': {'norm': x}} -> {'model.norm': x}."""
  out = {}
  for k, v in d.items():
    out.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def group_by_seed(runs) -> dict[str, list[Run]]:
  """Runs whose configs differ only by seed (and PLACE_FIELDS), as {variant name: runs}, in the order first seen.
  A name lists the fields that differ between the groups ('norm=rmsnorm,positions=rope'); 'base' when one group."""
  keyed = {}
  for run in runs:
    c = {k: v for k, v in flat(run.config).items() if k != 'seed' and k not in PLACE_FIELDS}
    keyed.setdefault(json.dumps(c, sort_keys=True), []).append(run)
  configs = [json.loads(k) for k in keyed]
  varying = [
    k for k in dict.fromkeys(k for c in configs for k in c) if len({json.dumps(c.get(k)) for c in configs}) > 1
  ]
  names = [variant_name({k: _text(c.get(k)) for k in varying}, varying) for c in configs]
  return dict(zip(_unique(names), keyed.values()))


def variant_name(swept: dict, keys) -> str:
  """'norm=rmsnorm,positions=rope': each key by its last part unless two of `keys` share it; filesystem-safe."""
  last = [k.rsplit('.', 1)[-1] for k in keys]
  short = {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}
  name = ','.join(f'{short[k]}={_compact(v)}' for k, v in swept.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name) or 'base'


def _compact(value: str) -> str:
  """A structured value's text as a readable name part: '[[0, {"code": 0.3}]]' -> '0+code-0.3'."""
  if value[:1] not in ('[', '{', '('):
    return value
  words = re.findall(r'[A-Za-z0-9._-]+', value.replace(':', ' - '))
  return '+'.join(words).replace('+-+', '-')


def _text(value) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return value if isinstance(value, str) else json.dumps(value)


def _unique(names):
  return [n if names.count(n) == 1 else f'{n}#{names[:i].count(n) + 1}' for i, n in enumerate(names)]


def _shown(key: str, value):
  """A value as the variant's line shows it: a sweep member's branch_from path as its source variant, since each
  seed's member branches from the source's member of its own seed (the path is seed 0's)."""
  if key == 'train.branch_from' and isinstance(value, str):
    m = re.fullmatch(r'.*/([^/]+)/seed=\d+:([^/:]+)', value)
    if m:
      return f'{m[1]}/seed=*:{m[2]}'
  return value


def config_diff(config: dict, base: dict) -> dict:
  """{key: (base value, this value)} for every field but the seed that differs (model.vocab_size left at 0 in the
  base is filled in by training, so it is not a difference)."""
  a, b = flat(base), flat(config)
  skip = {'seed'} | ({'model.vocab_size'} if a.get('model.vocab_size') == 0 else set())
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


# ---------------------------------------------------------------------------------------------- statistics


def stats(values) -> dict:
  """{'mean', 'std' (sample, ddof 1; nan for one value), 'n'} over the finite values."""
  xs = [x for x in values if x is not None and math.isfinite(x)]
  return {
    'mean': statistics.fmean(xs) if xs else math.nan,
    'std': statistics.stdev(xs) if len(xs) > 1 else math.nan,
    'n': len(xs),
  }


def welch(a, b) -> float | None:
  """Welch's two-sided p-value for mean(a) != mean(b); None when either side has fewer than 2 values or neither
  varies (the test is undefined)."""
  a, b = [x for x in a if math.isfinite(x)], [x for x in b if math.isfinite(x)]
  if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
    return None
  from scipy import stats as scipy_stats  # pylint: disable=import-outside-toplevel

  return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdict(metric: str, diff: float, p: float | None, alpha: float, n: tuple) -> str:
  """A plain sentence about a difference from the baseline."""
  if min(n) < 2:
    return 'no test: one seed'
  if p is None:
    return 'identical over every seed' if diff == 0 else 'no test: no spread over seeds'
  if p >= alpha:
    return f'within seed noise (p = {p:.2g})'
  better = column(metric)[1]
  word = 'different' if not better else ('better' if diff * better > 0 else 'worse')
  return f'{word}, p = {p:.2g}'


@dataclasses.dataclass
class Table:
  """Per variant: each summary's stats; per (variant, metric) against the baseline: diff, p and verdict."""

  groups: dict  # name -> runs
  baseline: str
  metrics: tuple
  alpha: float
  base_config: dict
  summaries: dict = dataclasses.field(default_factory=dict)  # name -> {summary: [per-run values]}
  columns: dict = dataclasses.field(default_factory=dict)  # summary -> column(summary): SUMMARIES, then task metrics

  def __post_init__(self):
    if self.baseline not in self.groups:
      raise WorkdirError(f'the baseline {self.baseline!r} is not among the variants ({", ".join(self.groups)})')
    per_run = {name: [r.summary() for r in runs] for name, runs in self.groups.items()}
    tasks = sorted({k for runs in per_run.values() for s in runs for k in s if k not in SUMMARIES} | set(self.metrics))
    self.columns = {k: column(k) for k in (*SUMMARIES, *(t for t in tasks if t not in SUMMARIES))}
    for name, runs in per_run.items():
      self.summaries[name] = {k: [s.get(k, math.nan) for s in runs] for k in self.columns}

  def stats(self, name: str, metric: str) -> dict:
    return stats(self.summaries[name][metric])

  def against_baseline(self, name: str, metric: str) -> dict:
    mine, base = self.summaries[name][metric], self.summaries[self.baseline][metric]
    s, b = stats(mine), stats(base)
    diff, p = s['mean'] - b['mean'], welch(mine, base)
    return {'diff': diff, 'p': p, 'verdict': verdict(metric, diff, p, self.alpha, (s['n'], b['n']))}

  def diff(self, name: str) -> dict:
    return config_diff(self.groups[name][0].config, self.base_config)


def _cell(s: dict, fmt: str) -> str:
  if s['n'] == 0:
    return '-'
  if s['n'] == 1 or s['std'] == 0:  # one seed, or a figure the seed does not change (parameters, steps)
    return format(s['mean'], fmt)
  return f'{format(s["mean"], fmt)} ± {format(s["std"], fmt)}'


# ---------------------------------------------------------------------------------------------- writing


def write(out_dir, groups, *, baseline, metrics=('val_loss',), alpha=0.05, base_config=None, title='', missing=()):
  """Writes results.csv, results.md and the plots into out_dir; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  base_config = base_config or groups[baseline][0].config
  table = Table(groups, baseline, tuple(metrics), alpha, base_config)
  paths = [os.path.join(out_dir, 'results.csv'), os.path.join(out_dir, 'results.md')]
  write_csv(table, paths[0])
  plots = plot(table, out_dir)
  with open(paths[1], 'w') as f:
    f.write(markdown(table, title, [os.path.basename(p) for p in plots], missing))
  return paths + plots


def write_csv(table: Table, path: str):
  header = ['variant', 'seeds']
  header += [f'{k}_{x}' for k in table.columns for x in ('mean', 'std')]
  header += [f'{m}_{x}' for m in table.metrics for x in ('diff', 'p', 'verdict')] + ['config_diff']
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    for name in table.groups:
      row = [name, len(table.groups[name])]
      for k in table.columns:
        s = table.stats(name, k)
        row += [_num(s['mean']), _num(s['std'])]
      for m in table.metrics:
        c = (
          table.against_baseline(name, m) if name != table.baseline else {'diff': 0.0, 'p': None, 'verdict': 'baseline'}
        )
        row += [_num(c['diff']), '' if c['p'] is None else f'{c["p"]:.6g}', c['verdict']]
      row.append('; '.join(f'{k}={b!r}' for k, (_, b) in table.diff(name).items()))
      w.writerow(row)


def _num(x) -> str:
  return '' if x is None or not math.isfinite(x) else f'{x:.6g}'


def markdown(table: Table, title: str, plots=(), missing=()) -> str:
  names = list(table.groups)
  n_runs = sum(len(r) for r in table.groups.values())
  out = [
    f'# {title or "lmjax compare"}',
    '',
    f'{n_runs} runs in {len(names)} variants; baseline `{table.baseline}`. Each cell is the mean ± sample standard '
    'deviation (ddof 1) over seeds.',
    '',
    '| variant | seeds | ' + ' | '.join(label for label, _, _ in table.columns.values()) + ' |',
    '|---|---:|' + '---:|' * len(table.columns),
  ]
  for name in names:
    cells = [_cell(table.stats(name, k), fmt) for k, (_, _, fmt) in table.columns.items()]
    label = f'`{name}`' + (' (baseline)' if name == table.baseline else '')
    out.append(f'| {label} | {len(table.groups[name])} | ' + ' | '.join(cells) + ' |')
  others = [n for n in names if n != table.baseline]
  if others:
    out += [
      '',
      '## Against the baseline',
      '',
      f"Welch's t-test (unequal variances) of each variant's seeds against the baseline's; better or worse when "
      f'p < {table.alpha:g}. Each p-value is one comparison, not corrected for the {len(others) * len(table.metrics)} '
      'made here.',
      '',
      '| variant | metric | variant − baseline | p | verdict |',
      '|---|---|---:|---:|---|',
    ]
    for name in others:
      for m in table.metrics:
        c = table.against_baseline(name, m)
        p = '-' if c['p'] is None else f'{c["p"]:.2g}'
        out.append(f'| `{name}` | {m} | {c["diff"]:+{table.columns[m][2]}} | {p} | {c["verdict"]} |')
  out += ['', '## Config of each variant against the base', '']
  for name in names:
    diff = table.diff(name)
    what = ', '.join(f'{k}: {_shown(k, a)!r} → {_shown(k, b)!r}' for k, (a, b) in diff.items()) or 'the base config'
    out.append(f'- `{name}`: {what}')
  out += ['', '## Provenance', ''] + provenance_lines(table.groups)
  if plots:
    out += ['', '## Val loss', '']
    out += [f'![val loss vs {p.rsplit("_", 1)[-1][:-4]}]({p})' for p in plots]
    out += [
      '',
      'Line: the mean over seeds; band: the lowest to the highest seed. Right panels zoom into the second half. '
      'Seconds: wall-clock seconds of training at each evaluation, averaged over seeds (a shared host makes them '
      'noisy).',
    ]
  if missing:
    out += ['', f'Not finished, so not included: {", ".join(missing)}.']
  return '\n'.join(out) + '\n'


def provenance_lines(groups) -> list[str]:
  """One line per recorded fact: the value all runs share, or which runs had which values."""
  facts = {}
  for name, runs in groups.items():
    for run in runs:
      for p in run.provenance:
        label = f'{name}/seed={run.seed}'
        commit = (p.get('git_commit') or '?')[:7] + (' (dirty tree)' if p.get('git_dirty') else ' (clean tree)')
        versions = ', '.join(f'{k} {v}' for k, v in sorted(p.get('versions', {}).items()))
        for fact, value in (
          ('commit', commit),
          ('versions', f'python {p.get("python")}, {versions}'),
          ('device', f'{p.get("device_count")} x {p.get("device_kind")}, {p.get("process_count")} process(es)'),
          ('host', f'{p.get("host_cpu")} ({p.get("host_cores")} cores)'),
        ):
          facts.setdefault(fact, {}).setdefault(value, []).append(label)
  lines = []
  for fact, values in facts.items():
    if len(values) == 1:
      lines.append(f'- {fact}: {next(iter(values))} (every run)')
    else:
      lines.append(f'- {fact} differs: ' + '; '.join(f'{v}: {", ".join(dict.fromkeys(r))}' for v, r in values.items()))
  return lines or ['- none recorded']


def plot(table: Table, out_dir: str) -> list[str]:
  """val_loss_vs_{step,tokens,seconds}.png: per variant the mean over seeds, banded by the lowest and highest."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')  # files only, no display
  import numpy as np  # pylint: disable=import-outside-toplevel
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  curves = {name: [r.curve() for r in runs] for name, runs in table.groups.items()}
  paths = []
  for axis, label in PLOTS.items():
    lines = {}  # name -> (x, mean, lowest, highest) over the evaluations every seed of the variant has
    for name, cs in curves.items():
      steps = sorted(set.intersection(*(set(c['step']) for c in cs)))
      if steps:
        at = [{s: i for i, s in enumerate(c['step'])} for c in cs]
        y_SxN = np.array([[c['val_loss'][a[s]] for c, a in zip(cs, at)] for s in steps])
        x_S = np.array([np.mean([c[axis][a[s]] for c, a in zip(cs, at)]) for s in steps])
        lines[name] = (x_S, y_SxN.mean(1), y_SxN.min(1), y_SxN.max(1), len(cs))
    fig, panels = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.concatenate([x for x, *_ in lines.values()]) if lines else np.zeros(1)
    half = (xs.min() + xs.max()) / 2
    for i, (name, (x, mean, low, high, n)) in enumerate(lines.items()):
      style = dict(marker='o', ms=2.5, lw=1.5, ls=('-', '--', '-.', ':')[i % 4])  # variants that overlap stay visible
      for ax, keep in zip(panels, (x >= x.min(), x >= half)):
        (line,) = ax.plot(x[keep], mean[keep], **style, label=f'{name} (n={n})')
        ax.fill_between(x[keep], low[keep], high[keep], color=line.get_color(), alpha=0.2, lw=0)
    for ax, what in zip(panels, ('', ', second half')):
      ax.set_xlabel(label + what)
      ax.set_ylabel('val loss')
      ax.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    fig.suptitle(f'val loss vs {label}: mean over seeds, band from the lowest to the highest seed', fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f'val_loss_vs_{axis}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def compare(args) -> int:
  """`lmjax compare DIR ... --out=OUT`: the sweep's table and plots for any workdirs."""
  found = find_runs(args.dirs)
  runs = [r for r in found if r.finished]
  unfinished = [r.workdir for r in found if not r.finished]
  if not runs:
    raise WorkdirError(f'none of the {len(found)} runs found has reached its train.steps: {", ".join(unfinished)}')
  groups = group_by_seed(runs)
  base = next(iter(groups))
  if args.baseline:
    want = os.path.normpath(args.baseline)
    hits = [n for n, rs in groups.items() if any(os.path.normpath(r.workdir) == want for r in rs)]
    if not hits:
      raise WorkdirError(f'--baseline={args.baseline} is not one of the workdirs compared')
    base = hits[0]
  metrics = tuple(m for m in args.metrics.split(',') if m)
  if problem := unknown_metrics(metrics, '--metrics'):
    raise WorkdirError(problem)
  if not 0 < args.alpha < 1:  # NaN too
    raise WorkdirError(f'--alpha={args.alpha}: a significance level is in (0, 1), e.g. 0.05')
  written = write(
    args.out, groups, baseline=base, metrics=metrics, alpha=args.alpha, title='lmjax compare', missing=unfinished
  )
  with open(written[1]) as f:
    print(f.read())
  for name, rs in groups.items():
    print(f'{name}: {", ".join(r.workdir for r in rs)}')
  print(f'wrote {", ".join(written)}')
  return 0
