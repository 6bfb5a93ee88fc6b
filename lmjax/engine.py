"""The static build of a run from its config: model, optimizer, mesh, shardings, and the jitted steps.

Used by training, evaluation, sampling, plan and bench alike. `Engine(config)` applies no training check;
`check_training(config, mesh)` is what the training loop (and plan/bench, which build the train step) add.
"""

from __future__ import annotations

import functools
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax import compiling, config as config_lib, hostenv, lora, model as model_lib, optim, parallel
from lmjax import steps
from lmjax.errors import ConfigError
from lmjax.steps import TrainState


class Engine:
  """Everything static about a run, built from its config: model, optimizer, mesh, shardings, compiled steps."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.model_cfg = config_lib.model_config(config)
    self.model = model_lib.Transformer(self.model_cfg)
    self.tx, self.lr_schedule = optim.make(config.optimizer, config.train.steps, config.train.ema_decay)
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.steps_per_call = config.train.steps_per_call
    self.rng = jax.random.key(config.seed)
    self.executables = compiling.ExecutableCache(config.train.compilation_cache_dir, config.to_dict())

    # Tracing the model's init for its shapes costs a warm start more than loading its executables: kept on disk
    self.rules = parallel.make_rules(config.mesh.rules)
    abstract_boxed, abstract_opt = self.executables.value('abstract_state', self._abstract_state)
    self.param_shardings = parallel.param_shardings(abstract_boxed, self.mesh, self.rules)
    abstract_params = nn.meta.unbox(abstract_boxed)
    optim.check_groups(config.optimizer, abstract_params)
    repl = parallel.replicated(self.mesh)
    self.n_params = model_lib.count_params(abstract_params)
    # With LoRA the train state's params are the adapters (small: replicated), and the model's full parameters
    # (`base_abstract`, on param_shardings) a frozen input of the train step (lmjax/lora.py).
    self.lora = lora.enabled(config)
    self.base = None  # LoRA: the frozen base parameters, set by whoever starts the run (set_base)
    self.base_abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, self.param_shardings
    )
    if self.lora:
      lora.check_model(config, self.model_cfg)
      abstract_params = lora.abstract(self.model_cfg, config, jnp.dtype(self.model_cfg.param_dtype))
      abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
      state_params = jax.tree.map(lambda _: repl, abstract_params)
      opt_shardings = jax.tree.map(lambda _: repl, abstract_opt)
    else:
      state_params = self.param_shardings
      opt_shardings = parallel.match_shardings(abstract_opt, abstract_params, self.param_shardings, self.mesh)
    self.state_shardings = TrainState(step=repl, params=state_params, opt_state=opt_shardings)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
    self.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_shardings
    )
    self.n_trainable = model_lib.count_params(abstract_params)
    self.flops_per_token = model_lib.flops_per_token(self.model_cfg, self.model_cfg.max_len)

    self.batch_sharding = parallel.batch_sharding(self.mesh, ndim=3)
    self.eval_batch_sharding = parallel.batch_sharding(self.mesh, ndim=2)
    step_kw = dict(
      model=self.model,
      tx=self.tx,
      grad_accum=config.train.grad_accum,
      skip_nonfinite=config.train.nonfinite == 'skip',
      z_loss=config.train.z_loss,
    )
    if self.lora:  # the base comes in as a fourth argument, never donated: every call reads the same arrays
      step_kw['merge'] = lora.merge_fn(config, self.model_cfg)
      train, base_in = steps.lora_train_steps, (self.param_shardings,)
    else:
      train, base_in = steps.train_steps, ()
    self.train_fn = jax.jit(
      parallel.traced_with(functools.partial(train, **step_kw), self.mesh, self.rules),
      in_shardings=(self.state_shardings, self.batch_sharding, repl, *base_in),
      out_shardings=(self.state_shardings, repl),
      donate_argnums=0,
    )
    self._merge = (
      jax.jit(lora.merge_fn(config, self.model_cfg), out_shardings=self.param_shardings) if self.lora else None
    )
    self.eval_fn = jax.jit(
      parallel.traced_with(functools.partial(steps.eval_step, model=self.model), self.mesh, self.rules),
      in_shardings=(self.param_shardings, self.eval_batch_sharding),
      out_shardings=repl,
    )
    self.train_batch_shape = (self.steps_per_call, config.train.batch_size, self.model_cfg.max_len)
    self._eval_executables = {}

  @property
  def batch_rows_divisor(self) -> int:
    """Rows of a batch must be a multiple of this: the devices the batch is split over (mesh data x fsdp)."""
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  def train_batch_spec(self) -> dict:
    """The train step's batch, as ShapeDtypeStructs with the keys the configured data pipeline yields (packed rows
    carry segment ids and positions): what training, `lmjax plan` and `lmjax bench` all compile."""
    from lmjax import data as data_lib  # pylint: disable=import-outside-toplevel  -- keeps sampling's imports light

    keys = data_lib.TRAIN_KEYS[self.config.data.rows]
    return {k: jax.ShapeDtypeStruct(self.train_batch_shape, dtype) for k, dtype in keys.items()}

  def put_train_batch(self, it) -> dict:
    """The next call's batch: steps_per_call batches from the iterator, stacked (S x B x L) and placed on the mesh
    (the shape and sharding every compiled train step takes)."""
    batches = [next(it) for _ in range(self.steps_per_call)]
    return parallel.put_batch({k: np.stack([b[k] for b in batches]) for k in batches[0]}, self.batch_sharding)

  def _abstract_state(self):
    """(parameters as ShapeDtypeStructs in their logical-axis boxes, the optimizer state as ShapeDtypeStructs)."""
    # Traced for the mesh's platform, like the steps: the attention kernel chosen depends on it.
    abstract_boxed = jax.eval_shape(parallel.traced_with(self._boxed_params, self.mesh, self.rules), self.rng)
    return abstract_boxed, jax.eval_shape(self.tx.init, nn.meta.unbox(abstract_boxed))

  def _boxed_params(self, rng):
    tokens = jnp.zeros((1, self.model_cfg.max_len), jnp.int32)
    return self.model.init({'params': rng}, tokens)['params']

  def base_view(self):
    """This engine as a reader of full parameters sees it (param_sources' `state(engine, ...)`): with LoRA, a
    state whose params are the model's, for loading the base."""
    if not self.lora:
      return self
    return types.SimpleNamespace(
      abstract_state=TrainState(self.abstract_state.step, self.base_abstract, None),
      model_cfg=self.model_cfg,
      mesh=self.mesh,
      param_shardings=self.param_shardings,
    )

  def fresh_params(self):
    """The model's parameters freshly initialised on param_shardings (a stand-in base where none is read)."""
    with parallel.activate(self.mesh, self.rules):
      return jax.jit(lambda r: nn.meta.unbox(self._boxed_params(r)), out_shardings=self.param_shardings)(self.rng)

  def set_base(self, params) -> None:
    """LoRA: the frozen base parameters (on param_shardings) the train step and model_params read."""
    self.base = params

  def model_params(self, params):
    """The model's full parameters for a train state's params: themselves, or with LoRA base + adapters merged."""
    return self._merge(self.base, params) if self.lora else params

  def bind(self, train_exec):
    """The compiled train step as the loop calls it, (state, batch, rng): with LoRA, the base bound as its last
    argument."""
    return BaseBound(train_exec, self.base) if self.lora else train_exec

  def init_state(self, params=None) -> TrainState:
    """Fresh state, created directly in its sharded layout (never materialised whole on one device). With
    `params` (already on this task's param shardings), the optimizer state is initialised from them instead."""
    if params is not None:
      init_opt = jax.jit(lambda p: TrainState(jnp.int32(0), p, self.tx.init(p)), out_shardings=self.state_shardings)
      with parallel.activate(self.mesh, self.rules):
        return init_opt(params)

    def init(rng):
      if self.lora:  # fresh adapters over the base (B = 0: the model starts as the base exactly)
        params = lora.init(rng, self.model_cfg, self.config, jnp.dtype(self.model_cfg.param_dtype))
      else:
        params = nn.meta.unbox(self._boxed_params(rng))
      return TrainState(jnp.int32(0), params, self.tx.init(params))

    with parallel.activate(self.mesh, self.rules):
      return compiling.run_once(
        jax.jit(init, out_shardings=self.state_shardings),
        jax.random.fold_in(self.rng, 0),
        cache=self.executables,
        name='init_state',
      )

  def compile_train(self, batch, compiler_options=None):
    """Ahead-of-time compilation of the train step for batches shaped like `batch` (global arrays or
    ShapeDtypeStructs), or its executable from train.compilation_cache_dir; returns (executable, seconds).
    `compiler_options`: XLA options for this compile only (lmjax plan's estimate)."""
    t0 = time.perf_counter()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in batch.items()}
    # The key as a shape only: a concrete one lives on this host's devices, which need not be the mesh's (a TPU
    # slice compiled for from a CPU host, lmjax/topology.py).
    rng = jax.ShapeDtypeStruct(self.rng.shape, self.rng.dtype, sharding=parallel.replicated(self.mesh))
    base = (self.base_abstract,) if self.lora else ()
    with parallel.activate(self.mesh):
      compiled = self.executables.compile(
        'train_step', self.train_fn, (self.abstract_state, batch, rng, *base), compiler_options
      )
    return compiled, time.perf_counter() - t0

  @property
  def dropout_rng(self):
    return jax.random.fold_in(self.rng, 1)

  def evaluate(self, params, batches, bytes_per_token: float = 0.0, by_source=None) -> dict:
    """Mean loss, perplexity and bits per byte (tokenizer-independent) over the given eval batches; one host
    sync at the end. `by_source`: a mixture's {name: (batches, bytes per token)} (Data.source_evals), whose
    batches together are `batches`: each is evaluated once, alone (val_loss/NAME, ...) and pooled."""
    if not by_source:
      return eval_metrics(*self.eval_sums(params, batches), bytes_per_token)
    sums = {name: self.eval_sums(params, source_batches) for name, (source_batches, _) in by_source.items()}
    out = eval_metrics(sum(t for t, _ in sums.values()), sum(c for _, c in sums.values()), bytes_per_token)
    for name, (total, count) in sums.items():
      out.update(eval_metrics(total, count, by_source[name][1], source=name))
    return out

  def eval_sums(self, params, batches) -> tuple[float, float]:
    """(summed loss, weighted targets) over the given eval batches; one host sync at the end."""
    total = count = 0.0
    with parallel.activate(self.mesh):
      for b in batches:
        b = parallel.put_batch(b, self.eval_batch_sharding)
        t, c = self._eval_executable(params, b)(params, b)
        total, count = total + t, count + c
    return float(total), float(count)

  def _eval_executable(self, params, batch):
    """The eval step for this batch's shapes: compiled, or loaded from train.compilation_cache_dir, once per
    process (training evaluates every train.eval_every steps)."""
    shapes = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
    if shapes not in self._eval_executables:
      self._eval_executables[shapes] = self.executables.compile('eval_step', self.eval_fn, (params, batch))
    return self._eval_executables[shapes]


class BaseBound:
  """A compiled LoRA train step with its frozen base bound: called as (state, batch, rng), like any train step;
  the executable's own attributes (input_shardings, memory_analysis) read through."""

  def __init__(self, compiled, base):
    self.compiled, self.base = compiled, base

  def __call__(self, state, batch, rng):
    return self.compiled(state, batch, rng, self.base)

  def __getattr__(self, name):
    return getattr(self.compiled, name)


def eval_metrics(total: float, count: float, bytes_per_token: float = 0.0, source: str = '') -> dict:
  """val_loss, val_ppl and (given bytes per token) val_bpb of summed eval losses; `source` names them
  val_loss/SOURCE, ...: the one place eval sums become metrics."""
  loss = total / max(count, 1.0)
  out = {'val_loss': loss, 'val_ppl': float(np.exp(min(loss, 50.0)))}
  if bytes_per_token:
    out['val_bpb'] = float(loss / np.log(2) / bytes_per_token)
  return {f'{k}/{source}' if source else k: v for k, v in out.items()}


def check_training(config, mesh):
  """What training needs of the config on this mesh, beyond config.validate: batches split evenly over it."""
  tc = config.train
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  problems = []
  if tc.batch_size % (rows * tc.grad_accum):
    problems.append(
      f'train.batch_size ({tc.batch_size}) must be divisible by grad_accum ({tc.grad_accum}) x the '
      f'batch-sharding devices (mesh data x fsdp = {rows})'
    )
  if tc.eval_batch_size % rows:
    problems.append(f'train.eval_batch_size ({tc.eval_batch_size}) must be divisible by mesh data x fsdp ({rows})')
  if problems:
    raise ConfigError('; '.join(problems))


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
  otherwise the kernel's OOM killer ends the process without a word. The plan is a floor, not a guess: resident
  memory while the step runs is the plan plus the runtime and the data pipeline."""
  if next(iter(jax.tree.leaves(compiled.input_shardings)[0].device_set)).platform != 'cpu':
    return
  need, have = step_bytes_per_device(compiled.memory_analysis()), hostenv.memory_bytes()
  if need is None or have is None:
    return
  need *= jax.local_device_count()
  if need > have:
    raise ConfigError(
      f"the train step needs {need / 2**30:.1f} GiB of host memory (XLA's plan for {jax.local_device_count()} CPU "
      f'device(s)) and this machine has {have / 2**30:.1f} GiB for it. Lower train.batch_size (train.grad_accum '
      "keeps the effective batch), set model.remat='full', or shorten model.max_len; `lmjax plan --config=...` "
      'shows where the memory goes'
    )
