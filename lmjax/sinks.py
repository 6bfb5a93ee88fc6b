"""Where logged metrics go: train.trackers names the sinks, each one small class.

  jsonl        WORKDIR/metrics.jsonl, one JSON object per row: the record `lmjax compare` and sweeps read
  tensorboard  WORKDIR/tensorboard, event files written by tensorboardX (no TensorFlow)
  wandb        a Weights & Biases run (pip install 'lmjax[wandb]'): the wandb.* config names project, entity, run
               name, group, tags and mode; the resolved config is the run's config; a resumed lmjax run continues
               the same W&B run (its id is kept in WORKDIR/wandb_run.json); mode='offline' needs no network
               (`wandb sync WORKDIR/wandb/offline-run-*` uploads it later)

A sink that fails -- on opening (no network, a bad key, the package missing) or on a write -- is one warning and
is dropped; the run goes on. A new tracker is a subclass of Sink with `write` and `close`, its name in SINKS and
config.TRACKERS.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

from lmjax import config as config_lib, files

WANDB_RUN = 'wandb_run.json'


class Sink:
  """One destination of metric rows. `write(step, row)` gets the row as logged: 'step', 'time' and plain values
  (floats, ints, strings; a non-finite float is None)."""

  name = 'sink'

  def write(self, step: int, row: dict) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


class Jsonl(Sink):
  name = 'jsonl'

  def __init__(self, config, workdir: str, start_step: int):
    del config
    path = os.path.join(workdir, 'metrics.jsonl')
    drop_rows_after(path, start_step)  # a resumed run logs again the steps after its checkpoint
    self._f = open(path, 'a')  # noqa: SIM115  -- open for the run's whole length, closed by close()

  def write(self, step, row):
    self._f.write(json.dumps(row, allow_nan=False) + '\n')
    self._f.flush()

  def close(self):
    self._f.close()


class TensorBoard(Sink):
  name = 'tensorboard'

  def __init__(self, config, workdir: str, start_step: int):
    del config, start_step
    self._dir, self._writer = os.path.join(workdir, 'tensorboard'), None

  def write(self, step, row):
    if self._writer is None:  # importing tensorboardX costs the first training step nothing this way
      self._writer = _summary_writer_class()(self._dir)
    for k, v in row.items():
      if k not in ('step', 'time') and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer.add_scalar(k, v, step)

  def close(self):
    if self._writer is not None:
      self._writer.close()


class WandB(Sink):
  name = 'wandb'

  def __init__(self, config, workdir: str, start_step: int):
    del start_step
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise RuntimeError("the wandb package is not installed: pip install 'lmjax[wandb]'") from None
    w = config.wandb
    record = os.path.join(workdir, WANDB_RUN)
    run_id = _read_run_id(record) or secrets.token_hex(6)  # W&B's id rules: lowercase letters and digits do
    self._wandb = wandb
    self._run = wandb.init(
      project=w.project,
      entity=w.entity or None,
      name=w.name or os.path.basename(os.path.abspath(workdir)),
      group=w.group or None,
      tags=list(w.tags) or None,
      config=config.to_dict(),
      dir=workdir,
      id=run_id,
      resume='allow',
      mode=w.mode,
      settings=wandb.Settings(init_timeout=w.init_timeout_s, silent=True),
    )
    files.write_atomic(record, json.dumps({'id': run_id, 'project': w.project, 'entity': w.entity}))

  def write(self, step, row):
    # W&B keeps one value per step and never rewinds: steps a resumed run logs again keep their first values there
    # (metrics.jsonl holds the resumed run's).
    self._run.log({k: v for k, v in row.items() if k not in ('step', 'time') and v is not None}, step=step)

  def close(self):
    self._run.finish()


SINKS = {s.name: s for s in (Jsonl, TensorBoard, WandB)}
assert tuple(SINKS) == config_lib.TRACKERS


def _read_run_id(path: str) -> str | None:
  try:
    with open(path) as f:
      return json.load(f)['id']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def names(trackers: str) -> list[str]:
  """train.trackers ('jsonl,tensorboard') as a list of names."""
  return [t.strip() for t in trackers.split(',') if t.strip()]


def open_sinks(config, workdir: str, start_step: int, warn=None) -> list[Sink]:
  """The sinks train.trackers names, opened; one that cannot open is a warning and left out."""
  out = []
  for name in names(config.train.trackers):
    try:
      out.append(SINKS[name](config, workdir, start_step))
    except Exception as e:  # pylint: disable=broad-except  -- a tracker never stops a run
      (warn or _warn)(failed(name, 'could not start', e))
  return out


def failed(name: str, what: str, e: BaseException) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ''
  return f'lmjax: warning: the {name} tracker {what} ({type(e).__name__}: {first[:200]}); the run goes on without it'


def _warn(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX.writer imports torch at module level
  whenever it is installed, only to accept torch tensors; that import costs seconds of `lmjax train`'s start-up,
  and lmjax logs Python floats. A None entry in sys.modules makes `import torch` raise ImportError, which
  tensorboardX handles; the entry is removed at once, so torch stays importable. A process that already imported
  torch keeps it."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return SummaryWriter


def drop_rows_after(path: str, step: int) -> None:
  """Keeps the rows of metrics.jsonl up to `step` (the step a run resumes from), and drops a torn last line: a
  resumed run writes the later steps again, so the file holds one row per step and kind across any number of
  crashes and resumes."""
  if not os.path.exists(path):
    return
  kept, changed = [], False
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        changed = True
        continue
      if isinstance(row, dict) and row.get('step', 0) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
      else:
        changed = True
  if changed:
    files.write_atomic(path, ''.join(kept))
