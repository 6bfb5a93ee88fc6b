"""The training loop: feeds batches to the compiled train step, logs, and runs the periodic actions.

Read top to bottom: prepare (data, tokenizer, the starting state: a checkpoint, another run's parameters, or a
fresh init) -> the loop (dispatch step N+1, then read step N's metrics, so the host never stalls the device) ->
periodic actions (lmjax/actions.py) -> a clean stop. All I/O lives here, outside the pure steps (lmjax/steps.py);
the static build of a run is lmjax/task.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal

import jax
import numpy as np

from lmjax import actions as actions_lib, checkpoint, compiling, data as data_lib, hostenv
from lmjax import config as config_lib, metrics as metrics_lib, parallel, profiling, tokenizers as tokenizers_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import CheckpointError, ConfigError, TrainingError, WorkdirError
from lmjax.task import Task, check_host_memory, check_training


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
    K = tc.steps_per_call
    steps = max(1, math.ceil(tc.epochs * data.rows_per_epoch / tc.batch_size))
    with config.unlocked():
      tc.steps = -(-steps // K) * K
  return data


class _InitFrom:
  """train.init_from: the run whose parameters start this one. WORKDIR[:STEP|:best] is another lmjax run (an
  `lmjax import-hf` workdir among them); hf:DIR a saved transformers model, converted in memory (lmjax/hf.py).

  The source decides the architecture (config.ARCHITECTURE_FIELDS, and max_len with learned positions) and the
  tokenizer; this config decides everything else. A field this config sets away from its default, or that an
  override names (even with the default value), to a value that differs from the source's is an error naming it,
  rather than silently ignored."""

  def __init__(self, ref: str):
    self.ref = ref
    self.hf_params = None
    if ref.startswith('hf:'):
      from lmjax import hf  # pylint: disable=import-outside-toplevel

      fields, _, self.tokenizer, self.hf_params = hf.read(hf.resolve_source(ref[3:]))
      self.model = {**dataclasses.asdict(config_lib.ModelConfig()), **fields}
      return
    self.workdir, self.step = workdir_lib.split_ref(ref)
    if not os.path.isdir(self.workdir):
      raise WorkdirError(
        f'train.init_from={ref!r}: {self.workdir} is not a directory; give the --workdir of a '
        'trained run, optionally with :STEP or :best, or hf:DIR for a saved Hugging Face model'
      )
    self.tokenizer = workdir_lib.load_tokenizer(self.workdir)
    if self.tokenizer is None:
      raise WorkdirError(f'train.init_from={ref!r}: {self.workdir} holds no tokenizer.json; is it a trained run?')
    self.model = workdir_lib.load_config(self.workdir).model.to_dict()

  def adopt(self, config) -> None:
    """Sets this config's architecture and tokenizer kind to the source's (ConfigError on a conflict)."""
    fields = config_lib.ARCHITECTURE_FIELDS + (('max_len',) if self.model['positions'] == 'learned' else ())
    default, explicit = config_lib.ModelConfig(), config_lib.overridden(config)
    conflicts = [
      f'model.{k}={config.model[k]!r} (the source has {self.model[k]!r})'
      for k in fields
      if config.model[k] != self.model[k] and (config.model[k] != getattr(default, k) or f'model.{k}' in explicit)
    ]
    if conflicts:
      raise ConfigError(
        f'train.init_from={self.ref!r} decides the architecture, but this config sets {", ".join(conflicts)}; '
        'remove those settings (or start from a fresh init)'
      )
    spec = self.tokenizer.spec()
    with config.unlocked():
      for k in fields:
        config.model[k] = self.model[k]
      config.data.tokenizer = spec['kind']
      if spec['kind'] == 'spm':
        config.data.spm_vocab_size, config.data.spm_model_type = spec['vocab_size'], spec['model_type']

  def params(self, task: Task, config, tokenizer):
    """The source's parameters on this task's shardings (its optimizer state is never read)."""
    if self.hf_params is not None:
      from lmjax import model as model_lib  # pylint: disable=import-outside-toplevel

      params = (
        model_lib.stack_layers(self.hf_params, config.model.n_layers) if config.model.scan_layers else self.hf_params
      )
      return jax.tree.map(
        lambda a, x: jax.device_put(x.astype(a.dtype), a.sharding), task.abstract_state.params, params
      )
    best = self.step == 'best'
    checkpointer = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(self.workdir, best=best), data_iterator=False)
    step = None if best else self.step
    try:
      meta = checkpointer.read_meta(step)
      layout = {k: meta['config']['model'].get(k) for k in ('scan_layers', 'param_dtype')}
      wanted = {k: config.model[k] for k in layout}
      if layout != wanted:
        raise ConfigError(
          f'train.init_from={self.ref!r} was saved with model {layout}, this run asks for {wanted}; set the same '
          'model.scan_layers and model.param_dtype (lmjax.model.stack_layers / unstack_layers convert layouts)'
        )
      tokenizers_lib.check_same(meta.get('tokenizer', tokenizer.spec()), tokenizer.spec(), self.workdir)
      return checkpointer.restore_params(step, task.abstract_state).params
    finally:
      checkpointer.close()


def _imported(ckpt) -> bool:
  """Whether the workdir's checkpoint is a parameters-only import (`lmjax import-hf`), not a run to resume. A
  damaged newest step says nothing either way: resuming sets it aside (checkpoint.restore_newest)."""
  try:
    return ckpt.latest_step() is not None and bool(ckpt.read_meta().get('params_only'))
  except CheckpointError:
    return False


class _Preemption:
  """SIGTERM (a preempted TPU VM, a scheduler's stop) sets a flag; the loop checkpoints and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def _next_batches(it, K):
  batches = [next(it) for _ in range(K)]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _agree(timed_due: bool, stop: bool) -> tuple[bool, bool]:
  """One verdict for every process, so hosts take a checkpoint, or stop, at the same step: the clock is process 0's
  (hosts' clocks differ), and a SIGTERM that reached any host stops them all."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  flags_PxF = np.asarray(multihost_utils.process_allgather(np.array([timed_due, stop], np.int32)))
  return bool(flags_PxF[0, 0]), bool(flags_PxF[:, 1].any())


def train(config, workdir: str, actions=None, clock=None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics. `actions`: periodic actions run
  after the ones the config asks for (lmjax/actions.py). Raises Preempted after a SIGTERM's checkpoint.

  Process 0 holds the workdir's lock (lmjax/workdir.py Lock) for the whole run: a second job on the same workdir
  is refused instead of deleting the first one's checkpoints."""
  # SIGTERM is caught from here until the last checkpoint write has finished: a signal during start-up or the
  # final save stops the run at its next step boundary instead of killing a write.
  preempt = _Preemption()
  lock = None
  try:
    workdir_lib.ensure_writable(workdir)
    lock, refused = (workdir_lib.Lock(workdir), None) if jax.process_index() == 0 else (None, None)
    if lock is not None:
      try:
        lock.acquire()
      except WorkdirError as e:
        lock, refused = None, e
    if jax.process_count() > 1:  # the other hosts of a refused job stop too, instead of waiting on process 0
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      if not bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None))):
        raise refused or WorkdirError(f'{workdir} is in use by another job (process 0 found its lock); see its log')
    elif refused is not None:
      raise refused
    return _train(config, workdir, actions, clock, lock, preempt)
  finally:
    preempt.restore()
    if lock is not None:
      lock.release()


def _train(config, workdir, actions, clock, lock, preempt):
  compiling.enable_compilation_cache(config.train.compilation_cache_dir)
  tc, primary = config.train, jax.process_index() == 0
  actions_lib.check_eval_tasks(config)  # a bad train.eval_tasks entry or file fails here, before any work
  init_from = _InitFrom(tc.init_from) if tc.init_from else None
  if init_from is not None:
    init_from.adopt(config)
  data = prepare_data(config, workdir, init_from.tokenizer if init_from else None)
  hostenv.mark('data ready')
  task = Task(config)
  check_training(config, task.mesh)
  K = task.steps_per_call
  # The train step compiles on a second thread while the state is restored or initialised and the first batch
  # loads.
  compiled = compiling.in_background(task.compile_train, task.train_batch_spec())
  ckpt = best = None
  try:
    ckpt = checkpoint.Checkpointer(
      workdir_lib.checkpoint_dir(workdir),
      max_to_keep=tc.keep_checkpoints,
      save_interval_steps=tc.checkpoint_every or tc.steps,
    )
    if _imported(ckpt):
      raise WorkdirError(
        f'{workdir} holds an imported model, not a run to resume; fine-tune it into a new --workdir with '
        f'--config.train.init_from={workdir}'
      )
    best = (
      checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir, best=True), max_to_keep=1) if tc.keep_best else None
    )
    meta = {'config': config.to_dict(), 'tokenizer': data.tokenizer.spec()}
    if ckpt.latest_step() is not None:

      def restore(step):
        workdir_lib.check_compatible(ckpt.read_meta(step), config, data.tokenizer.spec(), workdir)
        return ckpt.restore(step, task.abstract_state, data_iter=data.train_iter)

      _, state = checkpoint.restore_newest(ckpt, restore, move_aside=primary)
      start = f'resuming at step {int(state.step)}'
    elif init_from is not None:
      state = task.init_state(params=init_from.params(task, config, data.tokenizer))
      start = f'parameters from {tc.init_from}'
    else:
      state = task.init_state()
      start = 'fresh start'
    hostenv.mark('state ready')
    workdir_lib.record(config, data.tokenizer, workdir, primary)
    batch = parallel.put_batch(_next_batches(data.train_iter, K), task.batch_sharding)
    hostenv.mark('first batch')
    train_exec, compile_s = compiled()
    hostenv.mark('train step ready')
    check_host_memory(train_exec)
  except BaseException:
    compiled.wait()  # XLA must not be compiling when the process exits: that aborts it (exit 134)
    for c in (ckpt, best):
      if c is not None:
        c.close()
    raise
  step = int(state.step)
  log = metrics_lib.Logger(
    workdir, enabled=primary, progress_total=tc.steps, progress_start=step, progress_bar=tc.progress_bar
  )
  log.echo(
    f'lmjax: {task.n_params:,} params | mesh {dict(task.mesh.shape)} | {task.mesh.size} x '
    f'{jax.devices()[0].device_kind} | {start} | {workdir}'
  )
  host_allocator = hostenv.allocator()  # on CPU, XLA's temporaries live in malloc: the allocator sets the step time
  log.echo(
    f'allocator: {host_allocator}' + (hostenv.jemalloc_hint(host_allocator) if jax.default_backend() == 'cpu' else '')
  )
  peak = metrics_lib.peak_flops_per_device(tc.peak_flops) * task.mesh.size
  how = compiling.ORIGINS[task.executables.origin['train_step']]
  log.echo(
    f'train step {how} in {compile_s:.2f}s; '
    f'first step {hostenv.seconds_since_process_start():.1f}s after the command started'
  )
  hostenv.mark('first step')

  periodic = actions_lib.from_config(config, best) + list(actions or ())
  log_interval = actions_lib.Action(every=tc.log_every)  # when metrics are logged: the actions' interval rule
  clock = clock or actions_lib.Clock()
  multihost = jax.process_count() > 1
  first, count = tc.profile_steps
  profile = profiling.ProfileWindow(first, count, workdir_lib.profile_dir(workdir)) if count else None
  timer = metrics_lib.StepTimer(step)
  pending, log_due, last = [], None, {}  # metrics stay on device until a log point
  stopped = False  # by a SIGTERM (on any host) before the last step
  skipped = {'run': 0, 'total': 0}  # train.nonfinite='skip': updates dropped, in a row and in all
  speed = {}  # the last window's tokens/s, MFU and ms/step

  def read_metrics(at_step):
    nonlocal last
    window = [(s, m) for s, m in pending if s <= at_step]
    stats = jax.device_get([m for _, m in window])  # the one host-device sync of a log window
    pending[:] = [(s, m) for s, m in pending if s > at_step]  # calls queued after it: they may still be running
    finished = itertools.takewhile(lambda sm: all(x.is_ready() for x in jax.tree.leaves(sm[1])), pending)
    per_step = timer.read(max([at_step] + [s for s, _ in finished]))
    if per_step is not None:
      tps = tc.batch_size * task.model_cfg.max_len / per_step
      speed.update(tokens_per_sec=tps, mfu=tps * task.flops_per_token / peak, ms_per_step=1000 * per_step)
    last = {
      'train_loss': float(stats[-1]['train_loss'][-1]),
      'lr': float(task.lr_schedule(at_step - 1)),
      'grad_norm': float(stats[-1]['grad_norm'][-1]),
      **speed,
    }
    # (step, finite) of every step in the window: a call that brought the run to step s took s - K + 1 ... s.
    finite = [(s - K + 1 + i, bool(ok)) for (s, _), m in zip(window, stats) for i, ok in enumerate(m['finite'])]
    bad = [s for s, ok in finite if not ok]
    too_many = None  # the step at which train.max_skipped updates in a row had been dropped
    if tc.nonfinite == 'skip':
      for s, ok in finite:
        skipped['run'] = 0 if ok else skipped['run'] + 1
        if skipped['run'] >= tc.max_skipped and too_many is None:
          too_many = s
      skipped['total'] += len(bad)
      last['skipped_steps'] = skipped['total']
    log.write(at_step, last)
    if lock is not None:
      lock.touch()  # the heartbeat another host reads to tell a live holder from a dead one
    if too_many is not None:
      raise TrainingError(
        f'{tc.max_skipped} updates in a row were skipped (loss, gradient or parameters not finite), the last at step '
        f'{too_many}; lower optimizer.lr or check the data. The checkpoints saved hold finite parameters'
      )
    if bad and tc.nonfinite == 'stop':
      saved = ckpt.all_steps()
      kept = f'the last checkpoint is step {saved[-1]} in {ckpt.directory}' if saved else 'no checkpoint was saved'
      raise TrainingError(
        f'the loss, gradient norm or updated parameters are not finite at step {bad[0]} (train loss '
        f'{last["train_loss"]}); nothing after step {bad[0] - 1} is saved and {kept}. Lower optimizer.lr, check the '
        'data, or set train.nonfinite=skip to drop such updates'
      )

  def run_actions(due, minutes):
    read_metrics(step)  # about to sync anyway: log now, then keep the actions' time out of the window
    loop = actions_lib.Loop(
      config=config,
      workdir=workdir,
      task=task,
      data=data,
      state=state,
      step=step,
      metrics=dict(last),
      checkpointer=ckpt,
      meta=meta,
      echo=log.echo,
    )
    for action in due:
      out = action.run(loop)
      action.ran(minutes)
      if out:
        log.write(step, out)
        last.update(out)
        loop.metrics.update(out)
    timer.restart(step)

  try:
    with parallel.activate(task.mesh):
      while step < tc.steps:
        if batch is None:
          batch = parallel.put_batch(_next_batches(data.train_iter, K), task.batch_sharding)
        if profile is None:
          state, m = train_exec(state, batch, task.dropout_rng)
        else:
          with profile.annotation(step, K):
            state, m = train_exec(state, batch, task.dropout_rng)
        batch = None
        step += K
        if profile is not None:
          profile.after(step, state)
        log.advance(K)
        pending.append((step, m))
        if log_due is not None:  # the previous call's metrics, read while this call runs
          read_metrics(log_due)
          log_due = None
        minutes = clock.minutes()
        due = [a for a in periodic if a.due(step, tc.steps, minutes)]
        log_point = log_interval.due(step, tc.steps, minutes)
        stop = preempt.requested
        if multihost:
          # The clock and SIGTERM differ between hosts. At the steps every host stops at anyway (a log point or a
          # step-based action: the same steps on all), they agree (_agree), so every host saves the same steps and
          # stops at the same one; elsewhere neither the clock nor a SIGTERM acts yet.
          by_step = [a for a in due if not a.timed]
          if by_step or log_point:
            timed_due, stop = _agree(any(a.timed for a in due), stop)
            due = [a for a in periodic if a in by_step or (a.timed and timed_due)]
          else:
            due, stop = [], False
        if due:
          run_actions(due, minutes)
        elif log_point:
          log_due = step
        if stop:
          stopped = True
          break
      if pending:
        read_metrics(log_due or step)
    if stopped:
      ckpt.save(step, state, data_iter=data.train_iter, meta=meta, force=True)
      log.echo(f'SIGTERM: saved a checkpoint at step {step}; run the same command again to resume.')
  finally:
    if profile is not None:
      profile.stop()
    ckpt.wait()
    ckpt.close()
    if best is not None:
      best.wait()
      best.close()
    log.close()
  if stopped:  # a SIGTERM after the last step (during the final writes) only waited for them: the run is done
    raise Preempted(f'stopped by SIGTERM at step {step}; the checkpoint is saved')
  return last
