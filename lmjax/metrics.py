"""Where numbers go: DIR/metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), the terminal.

Also the peak-FLOP/s table MFU is measured against. Only process 0 writes; the others get a logger that
does nothing, so the training loop never asks who it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

# Dense peak FLOP/s per device at the compute dtype researchers use there (bf16 on accelerators). Matched by
# substring of jax.devices()[0].device_kind, first hit wins. The CPU figure is XLA's f32 matmul peak on the project's
# 2-core development VM; CPUs differ widely, so `lmjax bench` prints its own measurement beside it, and
# train.peak_flops sets the figure MFU is computed against.
PEAK_FLOPS = (
  ('TPU v6', 918e12),
  ('TPU v5p', 459e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5e', 197e12),
  ('TPU v5', 459e12),  # v5p's devices call themselves 'TPU v5'; after the 'lite' entries it matches only them
  ('TPU v4', 275e12),
  ('H200', 989e12),
  ('H100', 989e12),
  ('A100', 312e12),
  ('L4', 121e12),
  ('cpu', 143e9),
)


def peak_flops_per_device(override: float = 0.0, device_kind: str = '') -> float:
  """PEAK_FLOPS of `device_kind` (default: this process's first device), or `override` when set."""
  if override:
    return float(override)
  kind = device_kind or jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return math.nan  # unknown device: MFU is reported as NaN rather than made up


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX.writer imports torch at module level
  whenever it is installed, only to accept torch tensors; that import took 1.5-3 s of `lmjax train`'s start-up here,
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


class StepTimer:
  """Seconds per step between two metric reads of a loop that queues the next call before reading the last one.

  `read(done)` takes the number of steps known finished at this read -- the step whose metrics were read, plus any
  calls queued after it that have finished too (where dispatch is synchronous, all of them have). Counting those
  keeps a window from holding their run time while another window gets their steps. A read that finds no new
  finished step returns None: the caller keeps its previous figure instead of dividing a sliver of time by zero.
  """

  def __init__(self, step: int, clock=time.perf_counter):
    self._clock = clock
    self.restart(step)

  def restart(self, step: int):
    """Opens a new window at `step`, all of whose steps are finished (after an eval or a save, say)."""
    self._t, self._done = self._clock(), step

  def read(self, done: int) -> float | None:
    now = self._clock()
    if done <= self._done:
      return None
    per_step = (now - self._t) / (done - self._done)
    self._t, self._done = now, done
    return per_step


class Logger:
  """Writes one metrics dict per call to metrics.jsonl and TensorBoard, and prints a line for humans."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    progress_total: int = 0,
    progress_start: int = 0,
    progress_bar: bool = True,
  ):
    self.enabled = enabled
    self._jsonl = self._tb = self._bar = None
    if not enabled:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    drop_rows_after(path, progress_start)  # a resumed run logs again the steps after its checkpoint
    self._jsonl = open(path, 'a')
    # TensorBoard's writer opens at the first write: importing tensorboardX takes ~0.15 s that the first training
    # step need not wait for.
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    if progress_bar and progress_total and sys.stderr.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=progress_total, initial=progress_start, unit='step', dynamic_ncols=True, leave=False)

  def write(self, step: int, metrics: dict, *, echo: bool = True):
    if not self.enabled:
      return
    row = {'step': int(step), 'time': round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False) + '\n')
    self._jsonl.flush()
    if self._tb is None:
      self._tb = _summary_writer_class()(self._tb_dir)
    for k, v in row.items():
      if k not in ('step', 'time') and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    if echo:
      self.echo(f'step {step:6d} | ' + ' | '.join(_fmt(k, v) for k, v in metrics.items()))

  def advance(self, n: int):
    if self._bar is not None:
      self._bar.update(n)

  def echo(self, text: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _plain(v):
  """A JSON value: numpy scalars become Python ones, and a non-finite float becomes null (strict JSON has no NaN)."""
  v = v.item() if hasattr(v, 'item') else v
  if isinstance(v, float):
    return float(v) if math.isfinite(v) else None
  return v


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
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, path)


def _fmt(k, v):
  if isinstance(v, float):
    if k == 'mfu':
      return f'mfu {100 * v:.1f}%'
    if k in ('tokens_per_sec',):
      return f'{k} {v:,.0f}'
    if k in ('lr',) or abs(v) < 1e-3:
      return f'{k} {v:.2e}'
    return f'{k} {v:.4f}'
  return f'{k} {v}'


def progress_bar(total: int, desc: str, unit: str):
  """A tqdm bar on stderr for a long loop outside training (sampling, scoring), or None when stderr is not a
  terminal."""
  if not sys.stderr.isatty():
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
