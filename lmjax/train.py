"""Training: start-up, then a short loop over the compiled train step, then a clean stop.

Read top to bottom: `start` (data, tokenizer, the starting state: a checkpoint, train.init_from through
lmjax/param_sources.py, or a fresh init; the step compiling meanwhile) -> `_loop` (dispatch step N+1, then read
step N's metrics, so the host never stalls the device; the parts it calls -- log window, non-finite guard,
schedule with multi-host agreement, profiler -- are lmjax/loop_parts.py) -> periodic actions (lmjax/actions.py)
-> `train`, which holds the lock and saves on SIGTERM. Metrics go to the sinks of train.trackers
(lmjax/sinks.py). All I/O lives here and in those modules, outside the pure steps (lmjax/steps.py); the static
build of a run is lmjax/engine.py. New per-step behaviour is an action (actions.register) or a part, not an edit of
the loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lmjax import actions as actions_lib, checkpoint, compiling, data as data_lib, hostenv, loop_parts, lora
from lmjax import metrics as metrics_lib, param_sources, parallel, sinks as sinks_lib, workdir as workdir_lib
from lmjax.errors import CheckpointError, ConfigError, WorkdirError
from lmjax.engine import Engine, check_host_memory, check_training


class Preempted(Exception):
  """The run stopped on SIGTERM after saving a checkpoint; running the same command again resumes it. The CLI turns
  it into exit code 143 (128 + SIGTERM), as a scheduler expects of a job it stopped."""


def prepare_data(config, workdir, tokenizer=None):
  """Data and tokenizer (the workdir's recorded one when it has one, else `tokenizer`, else one built from the
  data), with model.vocab_size filled in and, with train.epochs, train.steps computed."""
  data = data_lib.make_data(config, workdir_lib.load_tokenizer(workdir) or tokenizer, workdir=workdir)
  vocab = data.tokenizer.vocab_size
  with config.unlocked():
    if config.model.vocab_size == 0:
      config.model.vocab_size = vocab
  if config.model.vocab_size < vocab:
    raise ConfigError(
      f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
      f"vocabulary ({vocab}); set it to 0 to take the tokenizer's size"
    )
  tc = config.train
  if tc.epochs:  # the run's length in passes over the data: train.steps follows, and with it the schedule
    S = tc.steps_per_call
    steps = max(1, math.ceil(tc.epochs * data.rows_per_epoch / tc.batch_size))
    with config.unlocked():
      tc.steps = -(-steps // S) * S
  return data


def _imported(ckpt) -> bool:
  """Whether the workdir's checkpoint is a parameters-only import (`lmjax import-hf`), not a run to resume. A
  damaged newest step says nothing either way: resuming sets it aside (checkpoint.restore_newest)."""
  try:
    return ckpt.latest_step() is not None and bool(ckpt.read_meta().get('params_only'))
  except CheckpointError:
    return False


@dataclasses.dataclass
class Run:
  """A started run: everything the loop needs, made by `start` (data, tokenizer, state, compiled step)."""

  config: Any
  workdir: str
  engine: Engine
  data: Any  # lmjax.data.Data
  state: Any  # the train state, resumed, from train.init_from, or fresh
  ckpt: checkpoint.Checkpointer  # WORKDIR/checkpoints
  best: checkpoint.Checkpointer | None  # WORKDIR/best (train.keep_best)
  meta: dict  # what a checkpoint records beside the arrays
  train_exec: Any  # the compiled train step
  batch: Any  # the first batch, on device
  how: str  # 'resuming at step N' | 'parameters from REF' | 'fresh start'
  compile_s: float

  def close(self):
    """Waits for the checkpoint writes in flight, then closes the checkpointers (once), both even when a write
    failed; that failure is raised after."""
    failure = None
    for c in (self.ckpt, self.best):
      if c is None:
        continue
      try:
        c.wait()
      except CheckpointError as e:
        failure = failure or e
      c.close()
    self.ckpt = self.best = None
    if failure is not None:
      raise failure


def start(config, workdir: str) -> Run:
  """Start-up: data and tokenizer, the starting state (a checkpoint, train.init_from, train.branch_from, or a fresh
  init) and the compiled train step, which compiles on a second thread while the state is restored and the first
  batch loads."""
  compiling.enable_compilation_cache(config.train.compilation_cache_dir)
  tc, primary = config.train, jax.process_index() == 0
  actions_lib.check_eval_tasks(config)  # a bad train.eval_tasks entry or file fails here, before any work
  source = param_sources.open_source(tc.init_from) if tc.init_from else None
  if source is not None:
    param_sources.adopt(source, config)
  # A branch reads its source at its first start only; once it has saved a step it resumes as a run of its own.
  branch = param_sources.Branch(config) if tc.branch_from and not workdir_lib.saved_steps(workdir) else None
  data = prepare_data(config, workdir, (source or branch).tokenizer if (source or branch) else None)
  hostenv.mark('data ready')
  engine = Engine(config)
  check_training(config, engine.mesh)
  compiled = compiling.in_background(engine.compile_train, engine.train_batch_spec())
  ckpt = best = None
  try:
    ckpt, best = _checkpointers(config, workdir)
    meta = {'config': config.to_dict(), 'tokenizer': data.tokenizer.spec()}
    if tc.branch_from:
      meta['branched_from'] = param_sources.branch_point(tc.branch_from)
    base = None
    if engine.lora:  # the frozen base, read whether the adapters start fresh or resume; its digest is checked
      engine.set_base(param_sources.init_params(source, engine.base_view(), config))
      base = meta['lora_base'] = lora.fingerprint(param_sources.absolute_ref(tc.init_from), engine.base)
    if ckpt.latest_step() is not None:
      state = param_sources.restore(
        ckpt, engine, config, data.tokenizer.spec(), workdir, data_iter=data.train_iter, move_aside=primary, base=base
      )
      how = f'resuming at step {int(state.step)}'
    elif engine.lora:
      state, how = engine.init_state(), f'{lora.describe(config)} over {tc.init_from}'
    elif source is not None:
      state = engine.init_state(params=param_sources.init_params(source, engine, config))
      how = f'parameters from {tc.init_from}'
    elif tc.branch_from:
      branch = branch or param_sources.Branch(config)
      state, how = branch.state(engine, config, data), f'branched from {tc.branch_from}'
    else:
      state, how = engine.init_state(), 'fresh start'
    hostenv.mark('state ready')
    workdir_lib.record(config, data.tokenizer, workdir, primary, meta.get('branched_from') if branch else None)
    batch = engine.put_train_batch(data.train_iter)
    hostenv.mark('first batch')
    train_exec, compile_s = compiled()
    hostenv.mark('train step ready')
    check_host_memory(train_exec)
    train_exec = engine.bind(train_exec)
  except BaseException:
    compiled.wait()  # XLA must not be compiling when the process exits: that aborts it (exit 134)
    for c in (ckpt, best):
      if c is not None:
        c.close()
    raise
  return Run(config, workdir, engine, data, state, ckpt, best, meta, train_exec, batch, how, compile_s)


def _checkpointers(config, workdir):
  """WORKDIR/checkpoints (refusing an imported model's workdir: it is a source, not a run to resume) and, with
  train.keep_best, WORKDIR/best."""
  tc = config.train
  ckpt = checkpoint.Checkpointer(
    workdir_lib.checkpoint_dir(workdir),
    max_to_keep=tc.keep_checkpoints,
    save_interval_steps=tc.checkpoint_every or tc.steps,
  )
  if _imported(ckpt):
    ckpt.close()
    raise WorkdirError(
      f'{workdir} holds an imported model, not a run to resume; fine-tune it into a new --workdir with '
      f'--config.train.init_from={workdir}'
    )
  best = (
    checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir, best=True), max_to_keep=1) if tc.keep_best else None
  )
  return ckpt, best


def _announce(run: Run, log) -> None:
  """What runs where, how it started, and how long the start took."""
  engine = run.engine
  trained = f' ({engine.n_trainable:,} trained)' if engine.lora else ''
  log.echo(
    f'lmjax: {engine.n_params:,} params{trained} | mesh {dict(engine.mesh.shape)} | {engine.mesh.size} x '
    f'{engine.mesh.devices.flat[0].device_kind} | {run.how} | {run.workdir}'
  )
  host_allocator = hostenv.allocator()  # on CPU, XLA's temporaries live in malloc: the allocator sets the step time
  on_cpu = engine.mesh.devices.flat[0].platform == 'cpu'
  log.echo(f'allocator: {host_allocator}' + (hostenv.jemalloc_hint(host_allocator) if on_cpu else ''))
  how = compiling.ORIGINS[engine.executables.origin['train_step']]
  log.echo(
    f'train step {how} in {run.compile_s:.2f}s; '
    f'first step {hostenv.seconds_since_process_start():.1f}s after the command started'
  )


def _loop(run: Run, log, periodic, clock, preempt, heartbeat) -> tuple[int, dict, bool]:
  """Steps to train.steps: dispatch the next call, then read the previous call's metrics while it runs (the host
  never stalls the device), then run what is due. Returns (step, last logged metrics, stopped by SIGTERM)."""
  tc, engine = run.config.train, run.engine
  S = engine.steps_per_call
  step = int(run.state.step)
  peak = metrics_lib.peak_flops_per_device(tc.peak_flops) * engine.mesh.size
  window = loop_parts.LogWindow(engine, run.config, step, peak)
  guard = loop_parts.NonfiniteGuard(run.config, run.ckpt, log.echo)
  schedule = loop_parts.Schedule(periodic, tc.log_every, tc.steps, clock)
  profiler = loop_parts.Profiler(tc.profile_steps, workdir_lib.profile_dir(run.workdir))
  last, deferred, stopped = {}, None, False

  def log_window(at_step):  # the one host-device sync of a log window, then the non-finite policy on it
    row, finite = window.read(at_step)
    stop_run = guard.check(row, finite)  # adds skipped_steps; the error that ends the run, if the policy says so
    log.write(at_step, row)
    heartbeat()
    last.update(row)
    if stop_run is not None:
      raise stop_run
    return row

  try:
    with parallel.activate(engine.mesh):
      while step < tc.steps:
        batch = run.batch if run.batch is not None else engine.put_train_batch(run.data.train_iter)
        run.batch = None
        with profiler.call(step, S):
          run.state, m = run.train_exec(run.state, batch, engine.dropout_rng)
        step += S
        profiler.after(step, run.state)
        log.advance(S)
        window.add(step, m)
        if deferred is not None:  # the previous call's metrics, read while this call runs
          log_window(deferred)
          deferred = None
        due, log_point, stopped, minutes = schedule.at(step, preempt.requested)
        if due:
          row = log_window(step)  # about to sync anyway: log now, then keep the actions' time out of the window
          last.update(_run_actions(run, step, due, minutes, row, guard, log))
          window.restart(step)
        elif log_point:
          deferred = step
        if stopped:
          break
      if window.pending:
        log_window(deferred or step)
      if stopped:
        _run_actions(run, step, [actions_lib.Checkpoint()], 0.0, dict(last), guard, log)
        log.echo(f'SIGTERM: saved a checkpoint at step {step}; run the same command again to resume.')
  finally:
    profiler.stop()
  return step, last, stopped


def _run_actions(run: Run, step: int, due, minutes: float, row: dict, guard, log) -> dict:
  """The actions due at `step`, in order; each sees what the earlier ones returned. Returns their metrics."""
  view = actions_lib.Loop(
    config=run.config,
    workdir=run.workdir,
    engine=run.engine,
    data=run.data,
    state=run.state,
    step=step,
    metrics=dict(row),
    checkpointer=run.ckpt,
    meta=run.meta,
    echo=log.echo,
    confirm_save=guard.confirm_save,
  )
  out = {}
  for action in due:
    got = action.run(view)
    action.ran(minutes)
    if got:
      log.write(step, got)
      out.update(got)
      view.metrics.update(got)
  return out


def train(config, workdir: str, actions=None, clock=None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics. `actions`: periodic actions run
  after the ones the config asks for (lmjax/actions.py). Raises Preempted after a SIGTERM's checkpoint.

  Process 0 holds the workdir's lock (lmjax/workdir.py Lock) for the whole run: a second job on the same workdir
  is refused instead of deleting the first one's checkpoints."""
  # SIGTERM is caught from here until the last checkpoint write has finished: a signal during start-up or the
  # final save stops the run at its next step boundary instead of killing a write.
  preempt = loop_parts.Preemption()
  lock = None
  try:
    lock = _acquire(workdir)
    run = start(config, workdir)
    try:
      return _train(run, actions, clock, preempt, lock)
    finally:
      run.close()
  finally:
    preempt.restore()
    if lock is not None:
      lock.release()


def _acquire(workdir: str):
  """Process 0's lock of the workdir (None on the other processes); every process of a refused job stops."""
  workdir_lib.ensure_writable(workdir)
  lock, refused = (workdir_lib.Lock(workdir), None) if jax.process_index() == 0 else (None, None)
  if lock is not None:
    try:
      workdir_lib.refuse_foreign(workdir, 'train', workdir_lib.RUN_WRITES)
      lock.acquire()
    except WorkdirError as e:
      lock, refused = None, e
  if jax.process_count() > 1:  # the other hosts of a refused job stop too, instead of waiting on process 0
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    if not bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None))):
      raise refused or WorkdirError(f'{workdir} is in use by another job (process 0 found its lock); see its log')
  elif refused is not None:
    raise refused
  return lock


def _train(run: Run, actions, clock, preempt, lock) -> dict:
  """The loop between its logger's opening and closing, and the SIGTERM checkpoint."""
  tc = run.config.train
  step = int(run.state.step)
  log = metrics_lib.Logger(
    run.workdir,
    enabled=jax.process_index() == 0,
    progress_total=tc.steps,
    progress_start=step,
    progress_bar=tc.progress_bar,
    sinks=sinks_lib.open_sinks(run.config, run.workdir, step) if jax.process_index() == 0 else (),
  )
  try:
    _announce(run, log)
    hostenv.mark('first step')
    periodic = actions_lib.from_config(run.config, run.best) + list(actions or ())
    heartbeat = lock.touch if lock is not None else lambda: None  # another host tells a live holder from a dead one
    step, last, stopped = _loop(run, log, periodic, clock or actions_lib.Clock(), preempt, heartbeat)
    run.close()  # the last writes finish before the run counts as done
  finally:
    log.close()
  if stopped:  # a SIGTERM after the last step (during the final writes) only waited for them: the run is done
    raise Preempted(f'stopped by SIGTERM at step {step}; the checkpoint is saved')
  return last
