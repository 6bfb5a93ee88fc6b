"""Sweeps: an ablation as one file and one command.

A sweep file (experiments/NAME.py) defines `get_sweep()` returning a `Sweep`: a base config, the overrides every
member shares, what varies (a product of values and/or a list of override sets), the seeds, the baseline variant
and the metrics that decide. `lmjax sweep experiments/NAME.py --workdir=runs/NAME` expands it into members, loads
and validates every member's config before any runs, then trains them one after another in this process through
`train.train`, the function `lmjax train` calls. A member is finished when its workdir holds the checkpoint of its
last step: finished members are skipped (their files stay untouched), an interrupted one resumes, so running the
command again after a crash or a kill finishes the sweep. Then lmjax/results.py writes the comparison.

  runs/NAME/norm=rmsnorm,positions=rope/seed=1/   one member's workdir (an ordinary `lmjax train` workdir)
  runs/NAME/results.csv, results.md, *.png        the comparison (lmjax/results.py)
  runs/NAME/sweep.sbatch                          with --emit=slurm: a SLURM array script, one task per member

A variant may branch from another (train.branch_from, docs/recipes.md): `BranchFrom(variant, step)` as its
train.branch_from value names the source variant by its overrides, and each seed's member starts from the source's
member of the same seed at that step. Sources run before their branches (variants run in the order listed).

Members run in this process rather than as subprocesses: a kill of the sweep then leaves no orphaned trainer
holding a member's lock, and SIGTERM reaches the running member directly (it checkpoints; the sweep exits 143).
An error in one member is reported and the sweep goes on with the next.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import os
import shlex
import sys
import time
import traceback

from lmjax import actions, config as config_lib, results, workdir as workdir_lib
from lmjax.errors import ConfigError, DataError, SweepError, UserError, one_line


class Stopped(Exception):
  """A SIGTERM stopped the running member after its checkpoint; the CLI exits 143, as `lmjax train` does."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What a sweep file's get_sweep() returns. Keys are config keys ('model.norm'); values are Python values or
  override text ('rmsnorm', 3e-4, True, '(1, 2)'), parsed to the field's type as `--config.KEY=VALUE` is."""

  config: str  # the base config, 'configs/NAME.py[:variant]', relative to where lmjax runs (the repo root)
  overrides: dict = dataclasses.field(default_factory=dict)  # applied to every member first
  product: dict = dataclasses.field(default_factory=dict)  # key -> values: every combination is a variant
  variants: tuple = ()  # override dicts, one variant each; with `product`, each is combined with every combination
  seeds: tuple = (0,)  # the config's `seed` field; a variant's seeds are its members
  baseline: dict | str | None = (
    None  # the variant the others are compared with (its overrides or name; default the first)
  )
  metrics: tuple = ('val_loss',)  # results (lmjax/results.py SUMMARIES, or eval tasks' NAME/METRIC) to test
  alpha: float = 0.05  # a difference is reported as real when Welch's p < alpha


@dataclasses.dataclass(frozen=True)
class BranchFrom:
  """A variant's `train.branch_from` in a sweep file: the member of `variant` (its overrides, as listed in the
  sweep) with the same seed, at `step`. The variant's name shows it as branch_from=STEP."""

  variant: dict
  step: int


_BRANCH = '@'  # a member's train.branch_from before the sweep's --workdir is known: '@VARIANT_NAME:STEP'


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a sweep: a variant at one seed."""

  variant: str  # 'norm=rmsnorm,positions=rope': the swept overrides, the same for every seed
  seed: int
  overrides: tuple  # 'a.b=value' strings, in the order applied: the sweep's common ones, the variant's, the seed
  swept: dict  # the variant's own {key: value text}

  @property
  def name(self) -> str:
    return f'{self.variant}/seed={self.seed}'

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.variant, f'seed={self.seed}')

  def resolved(self, root: str) -> tuple:
    """The overrides with a BranchFrom made a path: the source variant's member of this seed under `root`."""

    def one(o):
      key, _, value = o.partition('=')
      if key != 'train.branch_from' or not value.startswith(_BRANCH):
        return o
      name, _, step = value[len(_BRANCH) :].rpartition(':')
      return f'{key}={os.path.join(root, name, f"seed={self.seed}")}:{step}'

    return tuple(map(one, self.overrides))


# ---------------------------------------------------------------------------------------------- the file


def load(path: str) -> Sweep:
  """Runs a sweep file's get_sweep(); every problem with the file is a SweepError naming it."""
  module = config_lib.load_file(path, SweepError, 'sweep', 'experiments/norm_pos.py')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path} defines no get_sweep(); a sweep file returns an lmjax.sweep.Sweep from get_sweep()')
  try:
    sweep = module.get_sweep()
  except Exception as e:  # pylint: disable=broad-except  -- e.g. Sweep(...) with a misspelt field
    raise SweepError(f'{path}: get_sweep() failed: {type(e).__name__}: {e}') from None
  if not isinstance(sweep, Sweep):
    raise SweepError(f'{path}: get_sweep() returned a {type(sweep).__name__}, not an lmjax.sweep.Sweep')
  return _checked(sweep, path)


def _checked(sweep: Sweep, path: str) -> Sweep:
  def need(ok, msg):
    if not ok:
      raise SweepError(f'{path}: {msg}')

  need(isinstance(sweep.config, str) and sweep.config, 'Sweep.config must name a config file, e.g. configs/tiny.py')
  for field in ('overrides', 'product'):
    need(isinstance(getattr(sweep, field), dict), f'Sweep.{field} must be a dict of config key -> value')
    bad = [k for k in getattr(sweep, field) if not isinstance(k, str)]
    need(not bad, f"Sweep.{field}'s keys must be config keys such as 'model.norm', got {bad!r}")
  for key, values in sweep.product.items():
    need(
      isinstance(values, (list, tuple)) and len(values) > 0,
      f'Sweep.product[{key!r}] must be a non-empty list of values, got {values!r}',
    )
    need(len(set(map(text, values))) == len(values), f'Sweep.product[{key!r}] repeats a value: {values!r}')
  need(
    isinstance(sweep.variants, (list, tuple)) and all(isinstance(v, dict) for v in sweep.variants),
    'Sweep.variants must be a list of dicts of config key -> value',
  )
  bad = [k for v in sweep.variants for k in v if not isinstance(k, str)]
  need(not bad, f"Sweep.variants' keys must be config keys such as 'model.norm', got {bad!r}")
  need(
    sweep.baseline is None or isinstance(sweep.baseline, (str, dict)),
    f"Sweep.baseline must be a variant's name or its overrides (a dict), got {sweep.baseline!r}",
  )
  seeds = sweep.seeds
  need(
    isinstance(seeds, (list, tuple)) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
    f'Sweep.seeds must be a non-empty list of ints, got {seeds!r}',
  )
  need(len(set(seeds)) == len(seeds), f'Sweep.seeds repeats a seed: {seeds!r}')
  swept = set(sweep.product) | {k for v in sweep.variants for k in v}
  need('seed' not in swept and 'seed' not in sweep.overrides, 'the seed is not swept by overrides: use Sweep.seeds')
  need(
    isinstance(sweep.metrics, (list, tuple)) and sweep.metrics and all(isinstance(m, str) for m in sweep.metrics),
    f'Sweep.metrics must be a non-empty list of result names (val_loss, ...), got {sweep.metrics!r}',
  )
  problem = results.unknown_metrics(sweep.metrics, 'Sweep.metrics')
  need(not problem, problem)
  alpha = sweep.alpha
  need(isinstance(alpha, (int, float)) and 0 < alpha < 1, f'Sweep.alpha must be a number in (0, 1), got {alpha!r}')
  return sweep


def text(value) -> str:
  """A value as override text: what `--config.KEY=` would be given (a BranchFrom: its step, for names)."""
  if isinstance(value, BranchFrom):
    return str(value.step)
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return value if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------------------- members


def variants(sweep: Sweep) -> list[dict]:
  """Every variant's {key: value text} (a BranchFrom kept as it is): each combination of `product`, combined with
  each of `variants`."""
  keys = list(sweep.product)
  combos = [dict(zip(keys, map(text, values))) for values in itertools.product(*sweep.product.values())]
  listed = [{k: v if isinstance(v, BranchFrom) else text(v) for k, v in v.items()} for v in sweep.variants] or [{}]
  out = []
  for combo in combos:
    for extra in listed:
      both = sorted(set(combo) & set(extra))
      if both:
        raise SweepError(f'{", ".join(both)} appear in both Sweep.product and Sweep.variants; set each key in one')
      out.append({**combo, **extra})
  return out


def expand(sweep: Sweep) -> list[Member]:
  """The members in the order they run: every variant at the first seed, then every variant at the next, so a
  slow hour of a shared host falls on one seed of many variants rather than on one variant. Names are unique and
  the same on every expansion."""
  found = variants(sweep)
  texts = [{k: text(x) for k, x in v.items()} for v in found]
  keys = list(dict.fromkeys(k for v in found for k in v))
  common = tuple(sweep_overrides(sweep))
  names = [results.variant_name(t, keys) for t in texts]
  overrides = _branch_texts(found, texts, names)
  members = [
    Member(name, seed, common + tuple(f'{k}={x}' for k, x in o.items()) + (f'seed={seed}',), t)
    for seed in sweep.seeds
    for name, t, o in zip(names, texts, overrides)
  ]
  names = [m.name for m in members]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise SweepError(f'two members would share the name {twice[0]!r}: make the swept values differ more')
  return members


def _branch_texts(found: list, texts: list, names: list) -> list[dict]:
  """Each variant's override texts, a BranchFrom as '@SOURCE_NAME:STEP' (Member.resolved makes it a path). The
  source is a variant listed earlier: within a seed, members train in the order of their variants."""
  out = []
  for i, variant in enumerate(found):
    branch = variant.get('train.branch_from')
    if not isinstance(branch, BranchFrom):
      out.append(texts[i])
      continue
    want = {k: text(x) for k, x in branch.variant.items()}
    sources = [j for j, t in enumerate(texts) if t == want]
    if not sources:
      raise SweepError(
        f'{names[i]}: BranchFrom({want}, {branch.step}) names no variant; the variants are {", ".join(names)}'
      )
    if sources[0] >= i:
      raise SweepError(f'{names[i]} branches from {names[sources[0]]}, which is listed after it: list sources first')
    out.append({**texts[i], 'train.branch_from': f'{_BRANCH}{names[sources[0]]}:{branch.step}'})
  return out


def baseline(sweep: Sweep, members) -> str:
  """The baseline variant's name."""
  names = list(dict.fromkeys(m.variant for m in members))
  if sweep.baseline is None:
    return names[0]
  if isinstance(sweep.baseline, str):
    if sweep.baseline not in names:
      raise SweepError(f'Sweep.baseline {sweep.baseline!r} is not a variant; the variants are {", ".join(names)}')
    return sweep.baseline
  want = {k: text(v) for k, v in sweep.baseline.items()}
  hits = list(dict.fromkeys(m.variant for m in members if m.swept == want))
  if not hits:
    raise SweepError(f'Sweep.baseline {want} matches no variant; the variants are {", ".join(names)}')
  return hits[0]


def select(members, pattern: str) -> list[Member]:
  """The members whose name matches the glob `pattern` ('*rmsnorm*', '*/seed=0'); all for ''."""
  if not pattern:
    return list(members)
  chosen = [m for m in members if fnmatch.fnmatchcase(m.name, pattern)]
  if not chosen:
    names = ', '.join(m.name for m in members)
    raise SweepError(f'--only={pattern!r} matches no member (a glob over names such as "*/seed=0"); members: {names}')
  return chosen


def check(sweep: Sweep, members, root: str) -> dict:
  """Loads and validates every member's config, and checks that a member's existing workdir recorded the values
  the sweep sets; raises one SweepError naming each failing member and its key. Returns {member name: config}."""
  configs, failures = {}, {}
  for m in members:
    try:
      configs[m.name] = config_lib.load(sweep.config, m.resolved(root))
      _check_recorded(m, configs[m.name], m.workdir(root))
      actions.check_eval_tasks(configs[m.name])  # their files, which training would read only once started
    except (ConfigError, DataError) as e:
      failures.setdefault(one_line(e), []).append(m.name)
  if failures:
    parts = [f'member {", ".join(names)}: {why}' for why, names in failures.items()]
    bad = sum(len(names) for names in failures.values())
    raise SweepError(f'{bad} of {len(members)} members cannot run: ' + '; '.join(parts))
  return configs


def _recorded(workdir: str):
  """The config a member's workdir recorded (None before its first start)."""
  return workdir_lib.load_config(workdir) if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG)) else None


def _check_recorded(member: Member, config, workdir: str):
  """A workdir that recorded other values for the sweep's overrides (the sweep file changed since) would be
  skipped or resumed as something it is not. Only the overrides are compared: training fills in other fields
  (the vocabulary size, the steps of train.epochs, an init_from source's architecture)."""
  recorded = _recorded(workdir)
  if recorded is None:
    return
  keys = dict.fromkeys(o.partition('=')[0] for o in member.overrides)
  old, new = (results.flat(results.plain(c)) for c in (recorded, config))
  diff = [f'{k}: recorded {old.get(k)!r}, now {new[k]!r}' for k in keys if old.get(k) != new[k]]
  if diff:
    raise ConfigError(
      f'{workdir} was trained with other values ({"; ".join(diff[:4])}); give the sweep a new --workdir, or move '
      'that member away to retrain it'
    )


def state(config, workdir: str) -> str:
  """'finished' (the checkpoint of the last step is saved), 'at step N' (resumable), or 'not started'."""
  steps = workdir_lib.saved_steps(workdir)
  recorded = _recorded(workdir)  # its train.steps is the resolved one (train.epochs)
  if (recorded or config).train.steps in steps:
    return 'finished'
  return f'at step {steps[-1]}' if steps else 'not started'


# ---------------------------------------------------------------------------------------------- emitting


def train_command(sweep: Sweep, member: Member, root: str) -> str:
  """The `lmjax train` line that runs `member`, exactly as the sweep runs it."""
  args = ['lmjax', 'train', f'--config={sweep.config}', f'--workdir={member.workdir(root)}']
  return shlex.join(args + [f'--config.{o}' for o in member.resolved(root)])


def slurm_script(sweep: Sweep, members, root: str, sweep_path: str) -> str:
  """A SLURM array script: task i runs member i's `lmjax train` line (a rerun resumes or finds it finished)."""
  cases = '\n'.join(f'  {i}) {train_command(sweep, m, root)} ;;' for i, m in enumerate(members))
  job = os.path.splitext(os.path.basename(sweep_path))[0]
  return f"""#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --array=0-{len(members) - 1}
#SBATCH --output={os.path.join(root, 'slurm-%A_%a.out')}
# Add your cluster's lines (--partition, --time, --gres=gpu:1, ...). SLURM's SIGTERM at the time limit makes a
# member checkpoint and exit 143; submitting again resumes the unfinished members.
# Written by: lmjax sweep {shlex.join([sweep_path, f'--workdir={root}', '--emit=slurm'])}
# When every task is done, the same command without --emit trains nothing and writes {root}/results.md.
set -euo pipefail
cd {shlex.quote(os.getcwd())}
case "$SLURM_ARRAY_TASK_ID" in
{cases}
esac
"""


# ---------------------------------------------------------------------------------------------- the command


def run(args) -> int:
  """`lmjax sweep FILE --workdir=DIR [--dry-run] [--only=GLOB] [--emit=commands|slurm]`; returns how many members
  failed. Raises Stopped after a SIGTERM."""
  if '://' in args.workdir:
    raise SweepError(f'--workdir {args.workdir}: lmjax sweep needs a local or shared filesystem path')
  sweep = load(args.sweep)
  members = expand(sweep)
  base = baseline(sweep, members)
  chosen = select(members, args.only)
  configs = check(sweep, members, args.workdir)  # every member, even with --only: the sweep is one experiment
  root = args.workdir
  if args.dry_run:
    for m in chosen:
      what = state(configs[m.name], m.workdir(root))
      print(f'{m.name:<48} {what:<12} {" ".join(m.overrides[len(sweep.overrides) :])}')
    print(f'{len(chosen)} of {len(members)} members; baseline {base}; workdir {root}')
    return 0
  if args.emit == 'commands':
    for m in chosen:
      print(train_command(sweep, m, root))
    return 0
  if args.emit == 'slurm':
    path = os.path.join(workdir_lib.ensure_writable(root), 'sweep.sbatch')
    with open(path, 'w') as f:
      f.write(slurm_script(sweep, chosen, root, args.sweep))
    print(f'wrote {path} ({len(chosen)} tasks); submit it with: sbatch {path}')
    return 0
  return _train_members(sweep, members, chosen, configs, base, args)


def _train_members(sweep, members, chosen, configs, base, args) -> int:
  from lmjax import train  # pylint: disable=import-outside-toplevel

  root, failed, t0 = args.workdir, [], time.monotonic()
  for i, m in enumerate(chosen, 1):
    workdir, config = m.workdir(root), configs[m.name]
    what = state(config, workdir)
    print(f'lmjax sweep: [{i}/{len(chosen)}] {m.name}: {what}', flush=True)
    if what == 'finished':
      continue
    try:
      train.train(config, workdir)
    except train.Preempted:
      print(f'lmjax sweep: SIGTERM: {m.name} saved a checkpoint; run the same command again to go on', flush=True)
      raise Stopped(m.name) from None
    except UserError as e:
      failed.append(m.name)
      print(f'lmjax sweep: {m.name} failed: {one_line(e)}', file=sys.stderr, flush=True)
    except Exception:  # pylint: disable=broad-except  -- one member's bug must not lose the rest of the sweep
      failed.append(m.name)
      traceback.print_exc()
      print(f'lmjax sweep: {m.name} failed (traceback above)', file=sys.stderr, flush=True)
  print(f'lmjax sweep: trained for {time.monotonic() - t0:.0f} s', flush=True)
  done = [m for m in members if state(configs[m.name], m.workdir(root)) == 'finished']
  if not any(m.variant == base for m in done):
    print(f'lmjax sweep: no results yet: the baseline {base} has no finished member', flush=True)
  else:
    groups = {}
    for m in done:
      groups.setdefault(m.variant, []).append(results.read_run(m.workdir(root)))
    try:  # the variants are diffed against the base config with the overrides they share
      base_config = results.plain(config_lib.load(sweep.config, sweep_overrides(sweep)))
    except ConfigError:  # a base that is valid only with a variant's overrides: diff against the baseline
      base_config = None
    written = results.write(
      root,
      groups,
      baseline=base,
      metrics=sweep.metrics,
      alpha=sweep.alpha,
      base_config=base_config,
      title=f'lmjax sweep {args.sweep}',
      missing=[m.name for m in members if m not in done],
    )
    print(f'lmjax sweep: {len(done)} of {len(members)} members finished; wrote {", ".join(written)}')
  if failed:
    print(
      f'lmjax sweep: {len(failed)} failed: {", ".join(failed)}; fix and run the same command again', file=sys.stderr
    )
  return len(failed)


def sweep_overrides(sweep: Sweep) -> list[str]:
  """The overrides every member shares: with the base config, the base the variants are diffed against."""
  return [f'{k}={text(v)}' for k, v in sweep.overrides.items()]
