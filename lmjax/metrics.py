"""Numbers on their way out: the logger (rows to the sinks of lmjax/sinks.py, lines to the terminal), the step
timer, and the peak-FLOP/s table MFU is measured against. Only process 0 writes; the others get a logger that
does nothing, so the training loop never asks who it is.
"""

from __future__ import annotations

import math
import sys
import time

import jax

from lmjax import sinks as sinks_lib

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
  """Sends one metrics dict per call to the sinks (lmjax/sinks.py: metrics.jsonl and TensorBoard unless told
  otherwise), and prints a line for humans. A sink that fails is one warning and is dropped."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    progress_total: int = 0,
    progress_start: int = 0,
    progress_bar: bool = True,
    sinks=None,
  ):
    self.enabled = enabled
    self._sinks, self._bar = [], None
    if not enabled:
      return
    if sinks is None:
      sinks = [sinks_lib.Jsonl(None, workdir, progress_start), sinks_lib.TensorBoard(None, workdir, progress_start)]
    self._sinks = list(sinks)
    if progress_bar and progress_total and sys.stderr.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=progress_total, initial=progress_start, unit='step', dynamic_ncols=True, leave=False)

  def write(self, step: int, metrics: dict, *, echo: bool = True):
    if not self.enabled:
      return
    row = {'step': int(step), 'time': round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
    self._each('failed to write', lambda sink: sink.write(int(step), row))
    if echo:
      self.echo(f'step {step:6d} | ' + ' | '.join(_fmt(k, v) for k, v in metrics.items()))

  def _each(self, what: str, call) -> None:
    for sink in list(self._sinks):
      try:
        call(sink)
      except Exception as e:  # pylint: disable=broad-except  -- a tracker never stops a run
        self._sinks.remove(sink)
        self.echo(sinks_lib.failed(sink.name, what, e))

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
    self._each('failed to close', lambda sink: sink.close())
    self._sinks = []


def _plain(v):
  """A JSON value: numpy scalars become Python ones, and a non-finite float becomes null (strict JSON has no NaN)."""
  v = v.item() if hasattr(v, 'item') else v
  if isinstance(v, float):
    return float(v) if math.isfinite(v) else None
  return v


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
