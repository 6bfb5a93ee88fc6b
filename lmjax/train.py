"""Training: the pure, jitted train and eval steps, and the loop that feeds, logs, evaluates and checkpoints.

Read top to bottom: TrainState -> loss -> train_step / eval_step (pure) -> Task (builds model, optimizer, mesh,
shardings and compiled steps from a config) -> train() (the loop; all I/O lives here, outside the steps).
"""
from __future__ import annotations

import functools
import itertools
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import checkpoint, config as config_lib, data as data_lib, hostenv, metrics as metrics_lib
from lmjax import model as model_lib, optim, parallel, runtime, tokenizers


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------ pure functions


def loss_terms(params, model, batch, *, train=False, rng=None):
  """(summed token NLL, number of target tokens) in float32. `weights` (if present) masks padding."""
  logits_BxLxV = model.apply({'params': params}, batch['inputs'], batch.get('positions'), batch.get('segment_ids'),
                             train=train, rngs={'dropout': rng} if rng is not None else None)
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch['targets'][..., None], axis=-1)[..., 0]
  nll_BxL = logz_BxL - target_logit_BxL
  if 'weights' in batch:
    return jnp.sum(nll_BxL * batch['weights']), jnp.sum(batch['weights'])
  return jnp.sum(nll_BxL), jnp.float32(nll_BxL.size)


def train_step(state: TrainState, batch, rng, *, model, tx, grad_accum: int = 1):
  """One optimizer step on one global batch -> (new state, metrics). Dropout keys derive from (rng, step), so a
  resumed run draws exactly the masks the uninterrupted run drew."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, micro, micro_rng):
    total, count = loss_terms(params, model, micro, train=True, rng=micro_rng)
    return total / count, (total, count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (_, (total, count)), grads = grad_fn(state.params, batch, rng)
  else:
    # Micro-batches in a scan: gradients of per-micro-batch means, averaged (equal-sized micro-batches).
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      micro, i = xs
      (_, (t, c)), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, t, c)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0), jnp.float32(0))
    (grads, total, count), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g: g / grad_accum, grads)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)  # optax.apply_updates, minus its dtype casts
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'train_loss': total / count, 'grad_norm': _global_norm(grads)}


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_steps(state, batches_KxBxL, rng, **kw):
  """K optimizer steps in one call (lax.scan over K stacked batches): the per-call cost of launching an executable
  is paid once per K steps. Metrics come back stacked, one value per step."""
  return jax.lax.scan(lambda s, b: train_step(s, b, rng, **kw), state, batches_KxBxL)


def eval_step(params, batch, *, model):
  return loss_terms(params, model, batch)


# ------------------------------------------------------------------------------------------ the task


class Task:
  """Everything static about a run, built from its config: model, optimizer, mesh, shardings, compiled steps."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.model_cfg = config_lib.model_config(config)
    self.model = model_lib.Transformer(self.model_cfg)
    self.tx, self.lr_schedule = optim.make(config.optimizer, config.train.steps)
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.steps_per_call = config.train.steps_per_call
    _check_train_config(config, self.mesh)
    self.rng = jax.random.key(config.seed)
    self.executables = runtime.ExecutableCache(config.train.compilation_cache_dir, config.to_dict())

    abstract_boxed = jax.eval_shape(self._boxed_params, self.rng)
    self.rules = parallel.make_rules(config.mesh.rules)
    self.param_shardings = parallel.param_shardings(abstract_boxed, self.mesh, self.rules)
    abstract_params = nn.meta.unbox(abstract_boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    repl = parallel.replicated(self.mesh)
    self.state_shardings = TrainState(step=repl, params=self.param_shardings,
                                      opt_state=parallel.match_shardings(abstract_opt, abstract_params,
                                                                         self.param_shardings, self.mesh))
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
    self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       abstract, self.state_shardings)
    self.n_params = model_lib.count_params(abstract_params)
    self.flops_per_token = model_lib.flops_per_token(self.model_cfg, self.model_cfg.max_len)

    K = self.steps_per_call
    self.batch_sharding = parallel.batch_sharding(self.mesh, ndim=3)
    self.eval_batch_sharding = parallel.batch_sharding(self.mesh, ndim=2)
    step_kw = dict(model=self.model, tx=self.tx, grad_accum=config.train.grad_accum)
    self.train_fn = jax.jit(parallel.traced_with(functools.partial(train_steps, **step_kw), self.mesh, self.rules),
                            in_shardings=(self.state_shardings, self.batch_sharding, repl),
                            out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.eval_fn = jax.jit(parallel.traced_with(functools.partial(eval_step, model=self.model), self.mesh, self.rules),
                           in_shardings=(self.param_shardings, self.eval_batch_sharding), out_shardings=repl)
    self.train_batch_shape = (K, config.train.batch_size, self.model_cfg.max_len)

  def _boxed_params(self, rng):
    tokens = jnp.zeros((1, self.model_cfg.max_len), jnp.int32)
    return self.model.init({'params': rng}, tokens)['params']

  def init_state(self) -> TrainState:
    """Fresh state, created directly in its sharded layout (never materialised whole on one device)."""
    def init(rng):
      params = nn.meta.unbox(self._boxed_params(rng))
      return TrainState(jnp.int32(0), params, self.tx.init(params))
    with parallel.activate(self.mesh, self.rules):
      return runtime.run_once(jax.jit(init, out_shardings=self.state_shardings), jax.random.fold_in(self.rng, 0),
                              cache=self.executables, name='init_state')

  def compile_train(self, batch):
    """Ahead-of-time compilation of the train step for batches shaped like `batch` (global arrays or
    ShapeDtypeStructs), or its executable from train.compilation_cache_dir; returns (executable, seconds)."""
    t0 = time.perf_counter()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in batch.items()}
    with parallel.activate(self.mesh):
      compiled = self.executables.compile('train_step', self.train_fn, (self.abstract_state, batch, self.dropout_rng))
    return compiled, time.perf_counter() - t0

  @property
  def dropout_rng(self):
    return jax.random.fold_in(self.rng, 1)

  def evaluate(self, params, batches, bytes_per_token: float = 0.0) -> dict:
    """Mean loss, perplexity and bits per byte (tokenizer-independent) over the given eval batches; one host
    sync at the end."""
    total = count = 0.0
    with parallel.activate(self.mesh):
      for b in batches:
        t, c = self.eval_fn(params, parallel.put_batch(b, self.eval_batch_sharding))
        total, count = total + t, count + c
    loss = float(total) / max(float(count), 1.0)
    out = {'val_loss': loss, 'val_ppl': float(np.exp(min(loss, 50.0)))}
    if bytes_per_token:
      out['val_bpb'] = float(loss / np.log(2) / bytes_per_token)
    return out


def _check_train_config(config, mesh):
  tc, K = config.train, config.train.steps_per_call
  if tc.steps <= 0:
    raise config_lib.ConfigError(f'train.steps ({tc.steps}) must be > 0')
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'steps'):
    if tc[name] < 0:
      raise config_lib.ConfigError(f'train.{name} ({tc[name]}) must be >= 0 (0 = only at the last step)')
    if tc[name] % K:
      raise config_lib.ConfigError(f'train.{name} ({tc[name]}) must be a multiple of train.steps_per_call ({K})')
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  if tc.batch_size % (rows * tc.grad_accum):
    raise config_lib.ConfigError(
        f'train.batch_size ({tc.batch_size}) must be divisible by grad_accum ({tc.grad_accum}) x the batch-sharding '
        f'devices (mesh data x fsdp = {rows})')
  if tc.eval_batch_size % rows:
    raise config_lib.ConfigError(
        f'train.eval_batch_size ({tc.eval_batch_size}) must be divisible by mesh data x fsdp ({rows})')


# ------------------------------------------------------------------------------------------ the loop

# Model fields a resumed run may change: they alter how the step computes, not what the parameters are.
_RESUMABLE_MODEL_CHANGES = ('dropout', 'attention', 'attention_chunk', 'remat', 'dtype')


def step_bytes_per_device(memory_stats) -> int | None:
  """Bytes one device needs while a compiled step runs, from XLA's buffer plan (`compiled.memory_analysis()`):
  arguments + outputs not donated + temporaries (`lmjax plan` prints the parts). None where the backend gives no
  analysis."""
  m = memory_stats
  if m is None:
    return None
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def check_host_memory(compiled):
  """On CPU, XLA's buffers are host memory. A step that cannot fit is refused with what to change, before it runs:
  otherwise the kernel's OOM killer ends the process without a word (seen: the 6L/384 recipe at batch 2048). The
  plan is a floor, not a guess: the 6L/384 step (a 5.2 GiB plan) ran at 5.9 GB resident, runtime and data beside."""
  if jax.default_backend() != 'cpu':
    return
  need, have = step_bytes_per_device(compiled.memory_analysis()), hostenv.memory_bytes()
  if need is None or have is None:
    return
  need *= jax.local_device_count()
  if need > have:
    raise config_lib.ConfigError(
        f'the train step needs {need / 2**30:.1f} GiB of host memory (XLA\'s plan for {jax.local_device_count()} CPU '
        f'device(s)) and this machine has {have / 2**30:.1f} GiB for it. Lower train.batch_size (train.grad_accum '
        'keeps the effective batch), set model.remat=\'full\', or shorten model.max_len; `lmjax plan --config=...` '
        'shows where the memory goes')


def check_compatible(recorded: dict, config, tokenizer_spec: dict | None, where: str):
  """Raises ConfigError when a checkpoint's model or tokenizer differs from this run's, naming the fields."""
  old, new = recorded['config']['model'], config.model.to_dict()
  diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in _RESUMABLE_MODEL_CHANGES and old.get(k) != new.get(k)}
  if diff:
    lines = ', '.join(f'model.{k}: checkpoint {a!r} vs run {b!r}' for k, b_a in diff.items() for a, b in [b_a])
    hint = (' (lmjax.model.stack_layers / unstack_layers convert parameters between the two layouts)'
            if 'scan_layers' in diff else '')
    raise config_lib.ConfigError(f'the checkpoint in {where} was trained with a different model ({lines}). Resume '
                                 f'with the config it was saved with, or start a new --workdir{hint}.')
  if tokenizer_spec is not None and 'tokenizer' in recorded:
    tokenizers.check_same(recorded['tokenizer'], tokenizer_spec, where)


def prepare_data(config, workdir):
  """Data and tokenizer (the workdir's recorded one when it has one), with model.vocab_size filled in."""
  os.makedirs(workdir, exist_ok=True)
  data = data_lib.make_data(config, tokenizers.load(workdir), workdir=workdir)
  vocab = data.tokenizer.vocab_size
  with config.unlocked():
    if config.model.vocab_size == 0:
      config.model.vocab_size = vocab
  if config.model.vocab_size < vocab:
    raise config_lib.ConfigError(f'model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer\'s '
                                 f'vocabulary ({vocab}); set it to 0 to take the tokenizer\'s size')
  return data


def record_run(config, tokenizer, workdir):
  """Writes the resolved config and the tokenizer into the workdir -- only after every check has passed, so a
  refused resume never overwrites what the workdir recorded."""
  if jax.process_index() == 0:
    tokenizers.save(tokenizer, workdir)
    config_lib.save(config, workdir)


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


def _due(step: int, every: int, last: int) -> bool:
  """An event with interval `every` (0: none before the last step) is due at `step`."""
  return step == last or (every > 0 and step % every == 0)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
  runtime.enable_compilation_cache(config.train.compilation_cache_dir)
  data = prepare_data(config, workdir)
  task = Task(config)
  # The train step compiles on a second thread while the state is restored or initialised and the first batch
  # loads (the CPU recipe's start to first step: ~2 s sooner on 2 cores).
  compiled = runtime.in_background(task.compile_train, {
      k: jax.ShapeDtypeStruct(task.train_batch_shape, dtype) for k, dtype in data.train_keys.items()})
  tc, K = config.train, task.steps_per_call
  primary = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=tc.keep_checkpoints,
                                 save_interval_steps=tc.checkpoint_every or tc.steps)
  meta = {'config': config.to_dict(), 'tokenizer': data.tokenizer.spec()}
  if ckpt.latest_step() is not None:
    check_compatible(ckpt.read_meta(), config, data.tokenizer.spec(), workdir)
    state = ckpt.restore(None, task.abstract_state, data_iter=data.train_iter)
  else:
    state = task.init_state()
  record_run(config, data.tokenizer, workdir)
  step = int(state.step)
  log = metrics_lib.Logger(workdir, enabled=primary, progress_total=tc.steps, progress_start=step,
                           progress_bar=tc.progress_bar)
  log.echo(f'lmjax: {task.n_params:,} params | mesh {dict(task.mesh.shape)} | {task.mesh.size} x '
           f'{jax.devices()[0].device_kind} | {"resuming at step " + str(step) if step else "fresh start"} | {workdir}')
  host_allocator = hostenv.allocator()  # on CPU, XLA's temporaries live in malloc: the allocator sets the step time
  log.echo(f'allocator: {host_allocator}' + (hostenv.jemalloc_hint(host_allocator) if jax.default_backend() == 'cpu'
                                             else ''))
  batch = parallel.put_batch(_next_batches(data.train_iter, K), task.batch_sharding)
  train_exec, compile_s = compiled()
  check_host_memory(train_exec)
  peak = metrics_lib.peak_flops_per_device(tc.peak_flops) * task.mesh.size
  how = {'compiled': 'compiled train step', 'lmjax cache': 'loaded the train step from the cache',
         "JAX's cache": "traced the train step and loaded it from JAX's cache"}[task.executables.origin['train_step']]
  log.echo(f'{how} in {compile_s:.2f}s; first step {runtime.seconds_since_process_start():.1f}s after the command '
           'started')

  preempt = _Preemption()
  timer = metrics_lib.StepTimer(step)
  pending, log_due, last = [], None, {}  # metrics stay on device until a log point
  speed = {}  # the last window's tokens/s, MFU and ms/step

  def read_metrics(at_step):
    nonlocal last
    stats = jax.device_get([m for s, m in pending if s <= at_step])  # the one host-device sync of a log window
    pending[:] = [(s, m) for s, m in pending if s > at_step]  # calls queued after it: they may still be running
    finished = itertools.takewhile(lambda sm: all(x.is_ready() for x in jax.tree.leaves(sm[1])), pending)
    per_step = timer.read(max([at_step] + [s for s, _ in finished]))
    if per_step is not None:
      tps = tc.batch_size * task.model_cfg.max_len / per_step
      speed.update(tokens_per_sec=tps, mfu=tps * task.flops_per_token / peak, ms_per_step=1000 * per_step)
    last = {'train_loss': float(stats[-1]['train_loss'][-1]), 'lr': float(task.lr_schedule(at_step - 1)),
            'grad_norm': float(stats[-1]['grad_norm'][-1]), **speed}
    if not np.isfinite(last['train_loss']):
      raise FloatingPointError(f'train loss is {last["train_loss"]} at step {at_step}; lower optimizer.lr or check '
                               'the data. The checkpoints already saved are kept.')
    log.write(at_step, last)

  try:
    with parallel.activate(task.mesh):
      while step < tc.steps:
        if batch is None:
          batch = parallel.put_batch(_next_batches(data.train_iter, K), task.batch_sharding)
        state, m = train_exec(state, batch, task.dropout_rng)
        batch = None
        step += K
        log.advance(K)
        pending.append((step, m))
        if log_due is not None:  # the previous call's metrics, read while this call runs
          read_metrics(log_due)
          log_due = None
        eval_due, save_due = _due(step, tc.eval_every, tc.steps), _due(step, tc.checkpoint_every, tc.steps)
        if _due(step, tc.log_every, tc.steps) or eval_due or save_due:
          if eval_due or save_due:  # about to sync anyway: log now, then keep eval/save out of the window
            read_metrics(step)
            if eval_due:
              ev = task.evaluate(state.params, data.eval_batches, data.eval_bytes_per_token)
              log.write(step, ev)
              last.update(ev)
            if save_due:
              ckpt.save(step, state, data_iter=data.train_iter, meta=meta, force=True)
            timer.restart(step)
          else:
            log_due = step
        if preempt.requested:
          break
      if pending:
        read_metrics(log_due or step)
    if preempt.requested:
      ckpt.save(step, state, data_iter=data.train_iter, meta=meta, force=True)
      log.echo(f'SIGTERM: saved a checkpoint at step {step}; run the same command again to resume.')
  finally:
    preempt.restore()
    ckpt.wait()
    ckpt.close()
    log.close()
  if preempt.requested:
    raise SystemExit(143)
  return last


# ------------------------------------------------------------------------------------------ using a trained run


def load_run(workdir: str, overrides=(), mesh=None, step=None, params_only=False):
  """(config, tokenizer, Task, state) of a trained workdir's checkpoint (latest unless `step`), restored onto
  `mesh` (default: the config's mesh over this process's devices) whatever mesh it was saved from.
  `params_only`: state.opt_state is None and the optimizer moments are never read (sampling, evaluation)."""
  config = config_lib.load_saved(workdir, overrides)
  tokenizer = tokenizers.load(workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    if ckpt.latest_step() is None:
      raise checkpoint.CheckpointError(f'{workdir}/checkpoints holds no checkpoint yet; train first')
    check_compatible(ckpt.read_meta(step), config, tokenizer.spec(), workdir)
    task = Task(config, mesh)
    state = (ckpt.restore_params if params_only else ckpt.restore)(step, task.abstract_state)
  finally:
    ckpt.close()
  return config, tokenizer, task, state


def evaluate_run(workdir: str, overrides=()) -> dict:
  """`lmjax eval`: loss and perplexity of a workdir's latest checkpoint over the whole eval split."""
  config, tokenizer, task, state = load_run(workdir, overrides, params_only=True)
  data = data_lib.make_data(config, tokenizer)
  return {'step': int(state.step), **task.evaluate(state.params, data.eval_batches, data.eval_bytes_per_token)}
