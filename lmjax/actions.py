"""Periodic actions of the training loop: evaluate, run evaluation tasks (train.eval_tasks), checkpoint, keep the
best checkpoint, checkpoint on a clock, and whatever another module registers (an export, a fault injector).

An action says when it is due (`due(step, last_step, minutes_since_start)`) and does its work in `run(loop)`,
returning metrics to log (or None). The loop (lmjax/train.py) syncs the device once before the actions due at a
step and runs them in order, so an action listed after `Evaluate` sees this step's eval metrics in
`loop.metrics`. To add one without editing the loop, pass it to `train.train(config, workdir, actions=[...])`, or
`register(factory)` where factory(config) returns an Action or None; registered factories run for every train().
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

from lmjax.evals import spec as eval_spec


@dataclasses.dataclass
class Loop:
  """What an action may read or use at a step: the loop's live objects (read-only by convention)."""

  config: Any
  workdir: str
  engine: Any  # lmjax.engine.Engine
  data: Any  # lmjax.data.Data
  state: Any  # the train state after `step` optimizer steps
  step: int
  metrics: dict  # this step's metrics so far (train loss, and what earlier actions returned)
  checkpointer: Any  # lmjax.checkpoint.Checkpointer of WORKDIR/checkpoints
  meta: dict  # what a checkpoint records beside the arrays (config, tokenizer spec)
  echo: Callable[[str], None]
  # (step, loss from the state) -> whether to save it; may raise: a state whose own loss is not finite is never
  # saved (loop_parts.NonfiniteGuard.confirm_save)
  confirm_save: Callable[[int, Any], bool] = lambda step, loss: True
  _state_loss: list = dataclasses.field(default_factory=list)

  def state_loss(self) -> float | None:
    """The loss this step's state gives: the val_loss an earlier action computed at this step, else the loss on
    the first eval batch (computed once per step); None without eval data."""
    if 'val_loss' in self.metrics:
      return self.metrics['val_loss']
    if not self._state_loss:
      batches = self.data.eval_batches[:1]
      self._state_loss.append(
        self.engine.evaluate(self.engine.model_params(self.state.params), batches)['val_loss'] if batches else None
      )
    return self._state_loss[0]

  def save(self, checkpointer, meta: dict) -> None:
    """Saves this step's state (and the data position) into `checkpointer`, once its loss is known finite."""
    if self.confirm_save(self.step, self.state_loss()):
      checkpointer.save(self.step, self.state, data_iter=self.data.train_iter, meta=meta, force=True)


class Action:
  """Base class: `every` steps (0 = only at the last step) and/or `minutes` of wall time (0 = off)."""

  name = 'action'

  def __init__(self, every: int = 0, minutes: float = 0.0, at_last_step: bool = True):
    self.every, self.minutes, self.at_last_step = every, minutes, at_last_step
    self._last_minutes = 0.0

  @property
  def timed(self) -> bool:
    """Due by the clock: on several hosts the clock's verdict is agreed on before the action runs."""
    return self.minutes > 0

  def due(self, step: int, last_step: int, minutes: float) -> bool:
    if self.at_last_step and step == last_step:
      return True
    if self.every > 0 and step % self.every == 0:
      return True
    return self.timed and minutes - self._last_minutes >= self.minutes

  def ran(self, minutes: float):
    """Called by the loop after run(): the clock of a timed action restarts."""
    self._last_minutes = minutes

  def run(self, loop: Loop) -> dict | None:
    raise NotImplementedError


class Evaluate(Action):
  """Loss, perplexity and bits per byte over the eval split; for a mixture, over all its sources' eval splits
  and over each alone (val_loss/NAME, ...); with train.ema_decay, of the EMA too (ema_val_loss, ...)."""

  name = 'evaluate'

  def run(self, loop):
    d = loop.data
    evaluate = lambda p: loop.engine.evaluate(p, d.eval_batches, d.eval_bytes_per_token, d.source_evals)
    out = evaluate(loop.engine.model_params(loop.state.params))
    if loop.config.train.ema_decay:
      from lmjax import optim  # pylint: disable=import-outside-toplevel  -- only runs with an EMA import it

      out.update({f'ema_{k}': v for k, v in evaluate(optim.ema_params(loop.state.opt_state)).items()})
    return out


class EvalTask(Action):
  """One of train.eval_tasks (lmjax/evals/spec.py): its numbers as NAME/METRIC. Its data is read and tokenized
  the first time it runs, and kept."""

  def __init__(self, spec, every: int):
    super().__init__(every=every)
    self.spec, self.name, self._task = spec, spec.name, None

  def run(self, loop):
    from lmjax.evals import tasks  # pylint: disable=import-outside-toplevel  -- only runs with eval tasks import it

    if self._task is None:
      self._task = tasks.build(self.spec, loop.config, loop.data.tokenizer, loop.engine)
    metrics, _ = self._task(loop.engine.model_params(loop.state.params))
    return {f'{self.name}/{k}': v for k, v in metrics.items()}


def eval_tasks(config) -> list[EvalTask]:
  """The actions of train.eval_tasks, at each task's every=N or train.eval_every; a bad entry is a ConfigError."""
  specs = eval_spec.parse_all(config.train.eval_tasks)
  return [EvalTask(s, s.get('every', config.train.eval_every)) for s in specs]


def check_eval_tasks(config) -> None:
  """Fails on a bad train.eval_tasks entry (ConfigError) or a missing or malformed file of one (DataError, naming
  the task): what training runs first, so neither waits for the first evaluation."""
  specs = eval_spec.parse_all(config.train.eval_tasks)
  if specs:
    from lmjax.evals import tasks  # pylint: disable=import-outside-toplevel  -- only runs with eval tasks import it

    for s in specs:
      tasks.check_data(s)


class Checkpoint(Action):
  """Saves the state, the data iterator's position and the metadata into WORKDIR/checkpoints (async)."""

  name = 'checkpoint'

  def run(self, loop):
    loop.save(loop.checkpointer, loop.meta)


class TimedCheckpoint(Checkpoint):
  """A checkpoint every `minutes` of wall time, whatever the step (preemptible machines)."""

  name = 'timed_checkpoint'

  def __init__(self, minutes: float):
    super().__init__(every=0, minutes=minutes, at_last_step=False)


class KeepBest(Action):
  """Keeps the checkpoint with the lowest `metric` seen so far in WORKDIR/best/ (one step), beside the last train.keep_checkpoints in
  checkpoints/. Runs where the metric is computed: list it after the action that returns it. The best value
  survives a resume: it is read back from the kept checkpoint's metadata."""

  name = 'keep_best'

  def __init__(self, metric: str, checkpointer, every: int = 0):
    super().__init__(every=every)
    self.metric, self.checkpointer = metric, checkpointer
    steps = checkpointer.all_steps()
    self.best = checkpointer.read_meta(steps[-1]).get('best', {}).get('value', math.inf) if steps else math.inf

  def run(self, loop):
    value = loop.metrics.get(self.metric)
    if value is None or not math.isfinite(value) or value >= self.best:
      return None
    self.best = value
    meta = {**loop.meta, 'best': {'metric': self.metric, 'value': value, 'step': loop.step}}
    loop.save(self.checkpointer, meta)
    return {f'best_{self.metric}': value}


_REGISTERED: list[Callable[[Any], Action | None]] = []


def register(factory: Callable[[Any], Action | None]) -> Callable:
  """Adds an action to every train(): `factory(config)` returns the Action (or None to stay out). Usable as a
  decorator; returns the factory."""
  _REGISTERED.append(factory)
  return factory


def unregister(factory) -> None:
  _REGISTERED.remove(factory)


def from_config(config, best_checkpointer=None) -> list[Action]:
  """The built-in actions a config asks for, in the order they run at a step, then the registered ones."""
  t = config.train
  out: list[Action] = [Evaluate(t.eval_every), *eval_tasks(config)]
  if t.keep_best:
    out.append(KeepBest(t.keep_best, best_checkpointer, every=t.eval_every))
  out.append(Checkpoint(t.checkpoint_every))
  if t.checkpoint_minutes:
    out.append(TimedCheckpoint(t.checkpoint_minutes))
  out += [a for a in (f(config) for f in _REGISTERED) if a is not None]
  return out


class Clock:
  """Minutes since the loop started; the loop reads it once per call of the train step (tests pass their own
  clock to drive time-based actions)."""

  def __init__(self, now=time.monotonic):
    self._now, self._t0 = now, now()

  def minutes(self) -> float:
    return (self._now() - self._t0) / 60.0
