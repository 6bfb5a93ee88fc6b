"""Where parameters come from: one reference, read by one function, for every command that needs them.

  WORKDIR         the newest checkpoint of an lmjax run that restores (an `lmjax import-hf` workdir among them)
  WORKDIR:STEP    that step exactly
  WORKDIR:best    the train.keep_best checkpoint
  hf:DIR          a saved transformers model (a directory, or a hub name already in the local cache), converted
                  in memory (lmjax/hf/)

`open_source(ref)` gives a Source: its model fields, tokenizer and recorded config, `adopt(config)` (training's
init_from: the source decides the architecture), and `state(engine)`, the parameters on the engine's shardings.
Training's init_from, `lmjax sample`, `lmjax eval` and `lmjax export-hf` all read parameters through it, and
`restore` below is the one path from a workdir's checkpoint to a state, resume included. Training's branch_from
(`Branch`) is another run's whole state at WORKDIR:STEP, read by `restore` too.
"""

from __future__ import annotations

import dataclasses
import os
import types

import jax

from lmjax import checkpoint, config as config_lib, lora as lora_lib, mixture, optim, parallel
from lmjax import workdir as workdir_lib
from lmjax.errors import CheckpointError, ConfigError, WorkdirError


def open_source(ref: str):
  """The Source a reference names (module docstring); a bad reference is a WorkdirError saying what to give."""
  return HFSource(ref[3:]) if ref.startswith('hf:') else WorkdirSource(ref)


class WorkdirSource:
  """A checkpoint of an lmjax workdir: WORKDIR, WORKDIR:STEP or WORKDIR:best."""

  GIVE = 'give the --workdir of a trained run, optionally with :STEP or :best, or hf:DIR for a saved Hugging Face model'

  def __init__(self, ref: str, give: str = GIVE):
    self.ref = ref
    self.workdir, self.step = workdir_lib.split_ref(ref)
    if not os.path.isdir(self.workdir):
      raise WorkdirError(f'{ref!r}: {self.workdir} is not a directory; {give}')
    self.tokenizer = workdir_lib.load_tokenizer(self.workdir)
    if self.tokenizer is None:
      raise WorkdirError(f'{ref!r}: {self.workdir} holds no tokenizer.json; is it a trained run?')
    recorded = workdir_lib.load_config(self.workdir)
    self.model = recorded.model.to_dict()
    # A LoRA run's checkpoints hold adapters: to its readers it is the merged model, base + adapters (`state`).
    self.lora = recorded if lora_lib.enabled(recorded) else None

  def config(self, overrides=()):
    """The run's recorded config with `overrides` applied (sampling and evaluation run the run as it was); for a
    LoRA run, the merged model's (lora off)."""
    config = workdir_lib.load_config(self.workdir, overrides)
    if self.lora is not None:
      with config.unlocked():
        config.lora.rank = 0
    return config

  def state(self, engine, config, params_only: bool = True, fields=None, params: str = 'raw'):
    """The checkpoint's state on `engine`'s shardings (opt_state None with `params_only`). `fields`: the model
    fields that must match the checkpoint's (default: all but RUNTIME ones). `params='ema'`: state.params is the
    EMA (train.ema_decay) the optimizer state holds, read with the whole optimizer state. A LoRA run's state is
    its base with the adapters merged in."""
    if params == 'ema' and not config.train.ema_decay:
      raise ConfigError(f'--params=ema: {self.workdir} kept no EMA of its parameters (train.ema_decay was 0)')
    if self.lora is not None:
      base, adapters, step = self.lora_parts(engine, config, fields)
      merged = jax.jit(lora_lib.merge_fn(self.lora, engine.model_cfg), out_shardings=engine.param_shardings)
      return engine.abstract_state.replace(step=step, params=merged(base, adapters), opt_state=None)
    return self._restore(engine, config, params_only, fields, params)

  def lora_parts(self, engine, config, fields=None):
    """(base parameters on `engine`'s shardings, adapters, step) of a LoRA run's checkpoint. The base is the one
    the checkpoint's fingerprint names, and must still be the same weights."""
    cfg = config_lib.ModelConfig(**self.lora.model.to_dict())
    meta = self._meta()
    ref = (meta.get('lora_base') or {}).get('ref') or self.lora.train.init_from
    base = open_source(ref).state(engine, config, fields=config_lib.fields(config_lib.LAYOUT)).params
    repl = parallel.replicated(engine.mesh)
    abstract = jax.tree.map(lambda x: x.update(sharding=repl), lora_lib.abstract(cfg, self.lora))
    view = types.SimpleNamespace(abstract_state=engine.abstract_state.replace(params=abstract, opt_state=None))
    got = self._restore(view, config, True, fields, 'raw', base=lora_lib.fingerprint(ref, base))
    return base, got.params, got.step

  def _meta(self) -> dict:
    best = self.step == 'best'
    with checkpoint.Checkpointer(workdir_lib.checkpoint_dir(self.workdir, best=best), data_iterator=False) as ckpt:
      if ckpt.latest_step() is None:
        raise CheckpointError(f'{self.workdir} holds no checkpoint yet; train first')
      return ckpt.read_meta(None if best or self.step is None else self.step)

  def _restore(self, engine, config, params_only, fields, params, base=None):
    best = self.step == 'best'
    ckpt = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(self.workdir, best=best), data_iterator=False)
    try:
      if ckpt.latest_step() is None:
        where = f'{self.workdir}/best (train.keep_best)' if best else f'{self.workdir}/checkpoints'
        raise CheckpointError(f'{where} holds no checkpoint yet; train first')
      step = None if best else self.step
      ema = params == 'ema'
      state = restore(
        ckpt,
        engine,
        config,
        self.tokenizer.spec(),
        self.workdir,
        step=step,
        params_only=params_only and not ema,
        fields=fields,
        what='Load it',
        base=base,
      )
      if ema:
        state = state.replace(
          params=optim.ema_params(state.opt_state), opt_state=None if params_only else state.opt_state
        )
      return state
    finally:
      ckpt.close()


class HFSource:
  """A transformers model directory (or a hub name in the local cache): its config.json, weights and tokenizer."""

  def __init__(self, source: str):
    from lmjax import hf  # pylint: disable=import-outside-toplevel  -- safetensors and tokenizers load only here

    self.ref, self._hf = f'hf:{source}', hf
    self.directory = hf.resolve_source(source)
    fields, _, self.tokenizer, self._params = hf.read(self.directory)
    self.model = {**dataclasses.asdict(config_lib.ModelConfig()), **fields}

  def config(self, overrides=()):
    config = self._hf.import_config(self.model, self.directory)
    with config.unlocked():
      config_lib.apply_overrides(config, overrides)
    return config_lib.validate(config)

  def state(self, engine, config, params_only: bool = True, fields=None, params: str = 'raw'):
    """The converted parameters on `engine`'s shardings, as a state at step 0 (an HF model has no optimizer state:
    `params_only` is always true here, and there is no EMA)."""
    del params_only, fields
    if params != 'raw':
      raise ConfigError(f'--params={params}: {self.ref} is a Hugging Face model, which has no EMA; drop --params')
    from lmjax import model as model_lib  # pylint: disable=import-outside-toplevel

    params = model_lib.stack_layers(self._params, config.model.n_layers) if config.model.scan_layers else self._params
    params = jax.tree.map(
      lambda a, x: jax.device_put(x.astype(a.dtype), a.sharding), engine.abstract_state.params, params
    )
    return engine.abstract_state.replace(step=jax.numpy.int32(0), params=params, opt_state=None)


def absolute_ref(ref: str) -> str:
  """`ref` with its directory made absolute (hub names stay as they are): what a checkpoint records of a base."""
  if ref.startswith('hf:'):
    return f'hf:{os.path.abspath(ref[3:])}' if os.path.isdir(ref[3:]) else ref
  workdir, step = workdir_lib.split_ref(ref)
  return os.path.abspath(workdir) + (f':{step}' if step is not None else '')


def adopt(source, config) -> None:
  """train.init_from: sets this config's architecture and tokenizer kind to the source's. The source decides the
  architecture (config.architecture_fields) and the tokenizer; this config decides everything else. A field this
  config sets away from its default, or that an override names (even with the default value), to a value that
  differs from the source's is a ConfigError naming it, rather than silently ignored."""
  fields = config_lib.architecture_fields(source.model['positions'])
  default, explicit = config_lib.ModelConfig(), config_lib.overridden(config)
  conflicts = [
    f'model.{k}={config.model[k]!r} (the source has {source.model[k]!r})'
    for k in fields
    if config.model[k] != source.model[k] and (config.model[k] != getattr(default, k) or f'model.{k}' in explicit)
  ]
  if conflicts:
    raise ConfigError(
      f'train.init_from={source.ref!r} decides the architecture, but this config sets {", ".join(conflicts)}; '
      'remove those settings (or start from a fresh init)'
    )
  spec = source.tokenizer.spec()
  with config.unlocked():
    for k in fields:
      config.model[k] = source.model[k]
    config.data.tokenizer = spec['kind']
    if spec['kind'] == 'spm':
      config.data.spm_vocab_size, config.data.spm_model_type = spec['vocab_size'], spec['model_type']


def init_params(source, engine, config):
  """train.init_from's parameters on `engine`'s shardings (its optimizer state is never read). The architecture was
  adopted; the stored layout (stacked layers, master dtype) must be this run's."""
  return source.state(engine, config, params_only=True, fields=config_lib.fields(config_lib.LAYOUT)).params


def restore(
  ckpt,
  engine,
  config,
  tokenizer_spec,
  workdir,
  *,
  step=None,
  params_only=False,
  data_iter=None,
  fields=None,
  move_aside=False,
  what='Resume',
  base=None,
):
  """The one path from a workdir's checkpoint to a state on `engine`'s shardings. `step` None: the newest step that
  restores (a damaged newest step is named, skipped, and with `move_aside` moved to DIR/damaged/); a number: that
  step exactly. The model (`fields`, see workdir.check_compatible) and tokenizer must be the checkpoint's;
  `data_iter` is set to the saved position; `params_only` leaves the optimizer state unread. `base`: LoRA adapters
  are restored, and the base fingerprint they recorded must be this one (lmjax/lora.py)."""

  def one(at):
    recorded = ckpt.read_meta(at)
    workdir_lib.check_compatible(recorded, config, tokenizer_spec, workdir, what=what, fields=fields)
    if (base is None) != (recorded.get('lora_base') is None):  # before any array: a mismatch is no damage
      has, wants = ('LoRA adapters', 'lora.rank=0') if base is None else ('full parameters', 'lora.rank > 0')
      raise ConfigError(
        f'the checkpoint in {workdir} holds {has}, and this config has {wants}; {what} with the config it was '
        'saved with, or start a new --workdir'
      )
    if base is not None:
      from lmjax import lora  # pylint: disable=import-outside-toplevel

      lora.check_base(recorded['lora_base'], base, workdir)
    if data_iter is not None:  # the saved data position is only meaningful for the same sources and past stages
      mixture.check_resume(recorded['config'].get('data', {}), config.data, at)
    if params_only:
      return ckpt.restore_params(at, engine.abstract_state)
    return ckpt.restore(at, engine.abstract_state, data_iter=data_iter)

  if step is not None:
    return one(step)
  return checkpoint.restore_newest(ckpt, one, move_aside=move_aside)[1]


# What a branch must share with its source for the source's state to mean the same here: the optimizer state's
# structure (the optimizer; clipping adds a state to the chain, and so does the EMA; Adafactor's decay is a transform
# of its own) and what decides the train stream the saved iterator position is in.
BRANCH_SAME = (
  'seed',
  'optimizer.name',
  'train.batch_size',
  'data.dataset',
  'data.train_split',
  'data.feature',
  'data.file_docs',
  'data.prompt_field',
  'data.completion_field',
  'data.rows',
  'data.window_stride',
  'data.tokenizer',
)
# on in both or off in both: each adds or changes a link of the optimizer chain
BRANCH_SAME_ON_OFF = ('optimizer.grad_clip', 'train.ema_decay', 'optimizer.lr_multipliers', 'optimizer.wd_multipliers')


class Branch:
  """train.branch_from=WORKDIR:STEP: the source run, checked against this config before any data or array is read."""

  def __init__(self, config):
    self.ref = config.train.branch_from
    self.workdir, self.step = workdir_lib.split_ref(self.ref)
    self.source = WorkdirSource(self.ref, give='give WORKDIR:STEP, the --workdir of a run and one of its saved steps')
    self.tokenizer = self.source.tokenizer
    recorded = self.source.config()
    get = lambda c, key: c[key.split('.')[0]][key.split('.')[1]] if '.' in key else c[key]
    differ = [
      f'{k} {get(recorded, k)!r} there, {get(config, k)!r} here'
      for k in BRANCH_SAME
      if get(recorded, k) != get(config, k)
    ] + [
      f'{k} {"on" if get(recorded, k) else "off"} there, {"on" if get(config, k) else "off"} here'
      for k in BRANCH_SAME_ON_OFF
      if bool(get(recorded, k)) != bool(get(config, k))
    ]
    if config.optimizer.name == 'adafactor' and bool(recorded.optimizer.weight_decay) != bool(
      config.optimizer.weight_decay
    ):
      differ.append('optimizer.weight_decay on/off (Adafactor keeps a state for it)')
    if differ:
      raise ConfigError(
        f'train.branch_from={self.ref!r} continues that run exactly, but this config differs from it: '
        f'{"; ".join(differ)}. Set them as the source has them, or use train.init_from (a fresh optimizer)'
      )
    if self.step % config.train.steps_per_call:
      raise ConfigError(
        f'train.branch_from={self.ref!r} starts at step {self.step}, not a multiple of train.steps_per_call '
        f'({config.train.steps_per_call}): branch from such a step, or lower steps_per_call'
      )
    if self.step >= config.train.steps:
      raise ConfigError(
        f'train.branch_from={self.ref!r} starts at step {self.step}, and train.steps ({config.train.steps}) '
        'ends the run there: give train.steps past the branch step'
      )

  def state(self, engine, config, data):
    """The source's whole state at the step, on `engine`'s shardings; `data`'s train iterator set to its position."""
    ckpt = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(self.workdir))
    try:
      if self.step not in ckpt.all_steps():
        kept = ', '.join(map(str, ckpt.all_steps())) or 'none'
        raise CheckpointError(
          f'train.branch_from={self.ref!r}: {self.workdir} keeps no checkpoint of step {self.step} (it keeps '
          f'{kept}); branch from a kept step, or save the steps you want with train.checkpoint_every'
        )
      return restore(
        ckpt,
        engine,
        config,
        self.tokenizer.spec(),
        self.workdir,
        step=self.step,
        data_iter=data.train_iter,
        what='Branch',
      )
    finally:
      ckpt.close()


def branch_point(ref: str) -> dict:
  """What checkpoints and provenance record of train.branch_from=WORKDIR:STEP (the source need not exist any more)."""
  workdir, step = workdir_lib.split_ref(ref)
  return {'workdir': os.path.abspath(workdir), 'step': step}
