"""Using a trained run: its config, tokenizer and checkpoint restored onto this host's devices, with none of
training's checks (a run trained on one device samples and evaluates on eight), and `lmjax eval`.

Sampling (lmjax/sample.py), evaluation and export to Hugging Face start here. Parameters only are restored by default: the
optimizer moments (twice the parameters' memory for AdamW) are never read.
"""

from __future__ import annotations

from lmjax import compiling, config as config_lib, hostenv, param_sources
from lmjax.errors import ConfigError
from lmjax.engine import Engine


def load_run(workdir: str, overrides=(), mesh=None, step=None, params_only=True, params='raw'):
  """(config, tokenizer, Engine, state) of a trained workdir's checkpoint (or of hf:DIR, a saved Hugging Face model),
  restored onto `mesh` (default: the config's mesh over this process's devices) whatever mesh it was saved from.
  `step`: a step number, 'best' (the train.keep_best checkpoint) or None (the newest that restores).
  `params_only`: state.opt_state is None. `params='ema'`: state.params is the EMA of the parameters (a run trained
  with train.ema_decay). The run's compilation caches (train.compilation_cache_dir) serve
  whatever the caller then compiles."""
  if step is not None and workdir.startswith('hf:'):
    raise ConfigError(f'--step={step} names a checkpoint of an lmjax run; {workdir} is a Hugging Face model')
  source = param_sources.open_source(workdir if step is None else f'{workdir}:{step}')
  config = source.config(overrides)
  compiling.enable_compilation_cache(config.train.compilation_cache_dir)
  engine = Engine(config, mesh)
  state = source.state(engine, config, params_only=params_only, params=params)
  hostenv.mark('restored')
  return config, source.tokenizer, engine, state


def evaluate_run(workdir: str, overrides=(), step=None, params='raw') -> dict:
  """`lmjax eval`: loss, perplexity and bits per byte of a workdir's checkpoint over the whole eval split."""
  from lmjax import data as data_lib  # pylint: disable=import-outside-toplevel  -- only evaluation reads data

  config, tokenizer, engine, state = load_run(workdir, overrides, step=step, params=params)
  fit_eval_batch(config, engine)
  batches, bytes_per_token, by_source = data_lib.eval_split(config, tokenizer)
  return {'step': int(state.step), **engine.evaluate(state.params, batches, bytes_per_token, by_source)}


def fit_eval_batch(config, engine):
  """Rounds train.eval_batch_size up to a multiple of this host's batch-sharding devices: the mesh evaluating a
  run need not be the one that trained it."""
  rows = engine.batch_rows_divisor
  if config.train.eval_batch_size % rows:
    with config.unlocked():
      config.train.eval_batch_size = -(-config.train.eval_batch_size // rows) * rows


def export_hf(workdir: str, out: str, step=None, params='raw', peft: bool = False) -> dict:
  """`lmjax export-hf`: a workdir's checkpoint (`step`: a number, 'best' or None for the newest) as a directory
  transformers' from_pretrained loads (lmjax/hf/); a LoRA run's merged, or with `peft` its adapters as a PEFT
  adapter directory. Everything that can be refused is, before an array is read."""
  import jax  # pylint: disable=import-outside-toplevel

  from lmjax import hf, model as model_lib, workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = workdir_lib.load_config(workdir)
  cfg = config_lib.ModelConfig(**config.model.to_dict())
  hf_config = hf.check_export(cfg, workdir_lib.load_tokenizer(workdir), out)
  if peft:
    return _export_peft(workdir, out, step, params, config, cfg)
  _, tokenizer, _, state = load_run(workdir, step=step, params=params)
  params = jax.device_get(state.params)  # whole arrays on the host, from whatever mesh they were restored onto
  if cfg.scan_layers:
    params = model_lib.unstack_layers(params)
  return {**hf.write_model(out, hf_config, params, cfg, tokenizer), 'step': int(state.step)}


def _export_peft(workdir, out, step, params, config, cfg) -> dict:
  """`lmjax export-hf --peft`: a LoRA run's adapters as adapter_config.json + adapter_model.safetensors."""
  import jax  # pylint: disable=import-outside-toplevel

  from lmjax import lora  # pylint: disable=import-outside-toplevel
  from lmjax.errors import InteropError  # pylint: disable=import-outside-toplevel
  from lmjax.hf import families, peft  # pylint: disable=import-outside-toplevel

  if not lora.enabled(config):
    raise InteropError(f'--peft writes LoRA adapters; {workdir} trained every parameter (lora.rank=0): drop --peft')
  if params != 'raw':
    raise ConfigError('--params=ema: a LoRA run keeps no EMA; drop --params')
  family = families.of_model(cfg)
  peft.check_family(family, config.lora.targets)
  source = param_sources.open_source(workdir if step is None else f'{workdir}:{step}')
  merged_config = source.config()
  engine = Engine(merged_config)
  _, adapters, at = source.lora_parts(engine, merged_config)
  base = source._meta().get('lora_base', {}).get('ref', config.train.init_from)  # pylint: disable=protected-access
  base = base[3:] if base.startswith('hf:') else base
  summary = peft.write_adapter(out, jax.device_get(adapters), cfg, config.lora, family, base)
  return {**summary, 'base': base, 'step': int(at)}
