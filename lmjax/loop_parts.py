"""The named parts the training loop (lmjax/train.py) calls at each call of the train step.

  LogWindow       the metrics of the calls since the last log point: read in one host-device sync, turned into
                  one row (train loss, lr, grad norm, tokens/s, MFU) and the per-step finite flags
  NonfiniteGuard  train.nonfinite: what a non-finite step or a non-finite loss before a save does to the run
  Schedule        which periodic actions are due at a step, and whether to stop; on several hosts one verdict
  Preemption      SIGTERM sets a flag the schedule reads
  Profiler        the jax.profiler window of train.profile_steps (a no-op outside it)

Each part holds its own state and none of them dispatches device work, so the loop stays a few lines: dispatch
the next call, read the previous one's metrics, run what is due.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal

import jax
import numpy as np

from lmjax import actions as actions_lib, metrics as metrics_lib, profiling
from lmjax.errors import TrainingError


# Step metrics only some configs produce (train.z_loss), logged like train_loss: their value at the log point.
OPTIONAL_METRICS = ('z_loss',)


class LogWindow:
  """Metrics of the queued calls stay on device until a log point reads them all at once."""

  def __init__(self, engine, config, step: int, peak_flops: float):
    self.engine, self.tc = engine, config.train
    self.pending: list = []  # (step the call brought the run to, its metrics on device)
    self.timer = metrics_lib.StepTimer(step)
    self.peak_flops = peak_flops
    self.speed: dict = {}  # the last window's tokens/s, MFU and ms/step, kept when a read finds no new finished step

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def read(self, at_step: int) -> tuple[dict, list[tuple[int, bool]]]:
    """(the row to log at `at_step`, [(step, finite)] of every step read): the one host-device sync of a window."""
    window = [(s, m) for s, m in self.pending if s <= at_step]
    stats = jax.device_get([m for _, m in window])
    self.pending = [(s, m) for s, m in self.pending if s > at_step]  # calls queued after it may still be running
    finished = itertools.takewhile(lambda sm: all(x.is_ready() for x in jax.tree.leaves(sm[1])), self.pending)
    per_step = self.timer.read(max([at_step] + [s for s, _ in finished]))
    if per_step is not None:
      tps = self.tc.batch_size * self.engine.model_cfg.max_len / per_step
      self.speed = {'tokens_per_sec': tps, 'mfu': tps * self.engine.flops_per_token / self.peak_flops}
      self.speed['ms_per_step'] = 1000 * per_step
    row = {
      'train_loss': float(stats[-1]['train_loss'][-1]),
      'lr': float(self.engine.lr_schedule(at_step - 1)),
      'grad_norm': float(stats[-1]['grad_norm'][-1]),
      **{k: float(stats[-1][k][-1]) for k in OPTIONAL_METRICS if k in stats[-1]},
      **self.speed,
    }
    # A call that brought the run to step s took steps s - S + 1 ... s (S = steps per call).
    S = self.engine.steps_per_call
    finite = [(s - S + 1 + i, bool(ok)) for (s, _), m in zip(window, stats) for i, ok in enumerate(m['finite'])]
    return row, finite

  def restart(self, step: int) -> None:
    """After the actions of a step: their time is not the train step's."""
    self.timer.restart(step)


class NonfiniteGuard:
  """train.nonfinite, the one home of the non-finite policy outside the step itself (lmjax/steps.py flags each
  step and, with 'skip', leaves the state as it was):

  - 'stop': a step whose loss, gradient norm or updated parameters are not finite ends the run at once;
  - 'skip': such updates were dropped; counted, and train.max_skipped in a row end the run;
  - either way, a checkpoint is written only of parameters whose own loss is finite (`confirm_save`): finite
    parameters can still give a non-finite loss, and a run must never keep a state it cannot evaluate ('stop'
    ends the run there, 'skip' leaves that checkpoint out).
  """

  def __init__(self, config, checkpointer, echo):
    self.policy, self.max_skipped = config.train.nonfinite, config.train.max_skipped
    self.checkpointer, self.echo = checkpointer, echo
    self.in_a_row = self.total = 0

  def check(self, row: dict, finite: list[tuple[int, bool]]) -> TrainingError | None:
    """Adds skipped_steps to `row` under 'skip'; returns the TrainingError that ends the run when the policy says
    so (the loop logs the row first, then raises it)."""
    bad = [s for s, ok in finite if not ok]
    if self.policy == 'skip':
      too_many = None  # the step at which max_skipped updates in a row had been dropped
      for s, ok in finite:
        self.in_a_row = 0 if ok else self.in_a_row + 1
        if self.in_a_row >= self.max_skipped and too_many is None:
          too_many = s
      self.total += len(bad)
      row['skipped_steps'] = self.total
      if too_many is not None:
        return TrainingError(
          f'{self.max_skipped} updates in a row were skipped (loss, gradient or parameters not finite), the last at '
          f'step {too_many}; lower optimizer.lr or check the data. {self._kept()}'
        )
    elif bad:
      return TrainingError(
        f'the loss, gradient norm or updated parameters are not finite at step {bad[0]} (train loss '
        f'{row["train_loss"]}); nothing after step {bad[0] - 1} is saved and {self._kept()}. Lower optimizer.lr, '
        'check the data, or set train.nonfinite=skip to drop such updates'
      )
    return None

  def confirm_save(self, step: int, loss: float | None) -> bool:
    """Before a checkpoint of the state after `step`, with `loss` computed from that state (None: no eval data
    to compute it on): whether to save it. A non-finite loss is never saved: under 'stop' the run ends here
    (TrainingError), under 'skip' it is a warning and the run goes on to its next checkpoint."""
    if loss is None or math.isfinite(loss):
      return True
    what = f'the parameters after step {step} are finite but give a non-finite loss ({loss}) on the eval data'
    if self.policy == 'skip':
      self.echo(f'lmjax: warning: {what}; that checkpoint is not saved (train.nonfinite=skip goes on)')
      return False
    raise TrainingError(f'{what}, so they are not saved; {self._kept()}. Lower optimizer.lr or check the data')

  def _kept(self) -> str:
    saved = self.checkpointer.all_steps()
    where = self.checkpointer.directory
    return f'the last checkpoint is step {saved[-1]} in {where}' if saved else 'no checkpoint was saved'


class Schedule:
  """Which actions are due after a call, whether it is a log point, and whether to stop."""

  def __init__(self, periodic, log_every: int, last_step: int, clock):
    self.periodic, self.last_step, self.clock = periodic, last_step, clock
    self.log_interval = actions_lib.Action(every=log_every)  # log points follow the actions' interval rule
    self.multihost = jax.process_count() > 1

  def at(self, step: int, stop_requested: bool) -> tuple[list, bool, bool, float]:
    """(due actions, log point, stop, minutes since the start) after the call that brought the run to `step`."""
    minutes = self.clock.minutes()
    due = [a for a in self.periodic if a.due(step, self.last_step, minutes)]
    log_point = self.log_interval.due(step, self.last_step, minutes)
    stop = stop_requested
    if self.multihost:
      # The clock and SIGTERM differ between hosts. At the steps every host stops at anyway (a log point or a
      # step-based action: the same steps on all), they agree, so every host saves the same steps and stops at the
      # same one; elsewhere neither the clock nor a SIGTERM acts yet.
      by_step = [a for a in due if not a.timed]
      if by_step or log_point:
        timed_due, stop = agree(any(a.timed for a in due), stop)
        due = [a for a in self.periodic if a in by_step or (a.timed and timed_due)]
      else:
        due, stop = [], False
    return due, log_point, stop, minutes


def agree(timed_due: bool, stop: bool) -> tuple[bool, bool]:
  """One verdict for every process, so hosts take a checkpoint, or stop, at the same step: the clock is process 0's
  (hosts' clocks differ), and a SIGTERM that reached any host stops them all."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  flags_PxF = np.asarray(multihost_utils.process_allgather(np.array([timed_due, stop], np.int32)))
  return bool(flags_PxF[0, 0]), bool(flags_PxF[:, 1].any())


class Preemption:
  """SIGTERM (a preempted TPU VM, a scheduler's stop) sets a flag; the loop checkpoints and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


class Profiler:
  """train.profile_steps = (first, count): a trace of the calls taking steps first + 1 ... first + count."""

  def __init__(self, profile_steps, log_dir: str):
    first, count = profile_steps
    self.window = profiling.ProfileWindow(first, count, log_dir) if count else None

  def call(self, step: int, steps_per_call: int):
    """The context around the call that takes steps step + 1 ... step + steps_per_call."""
    if self.window is None:
      return contextlib.nullcontext()
    return self.window.annotation(step, steps_per_call)

  def after(self, step: int, state) -> None:
    if self.window is not None:
      self.window.after(step, state)

  def stop(self) -> None:
    if self.window is not None:
      self.window.stop()
