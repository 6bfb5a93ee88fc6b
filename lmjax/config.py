"""Experiment configs: every field with its default and meaning, loading a config file, command-line overrides.

A config file in configs/ defines `get_config(arg=None)` that starts from `default_config()` and changes what the
experiment changes. `--config=configs/x.py:variant` passes 'variant' as `arg` (one file, a family of ablations).
`--config.a.b=value` overrides a field; the value is parsed to the field's type and an unknown key is an error
that names the closest valid keys.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says how to fix it."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for init, data order and dropout; the same seed and config give the same run

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0 = the tokenizer's vocabulary size
  m.max_len = 64  # context length; training rows are this long
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 0  # 0 = n_heads; fewer gives grouped-query (1 = multi-query) attention
  m.d_model = 128
  m.d_ff = 0  # 0 = 4 * d_model
  m.dropout = 0.0  # on embeddings, attention weights and both residual branches (as nanoGPT)
  m.norm = 'layernorm'  # layernorm | rmsnorm
  m.norm_eps = 1e-5
  m.positions = 'learned'  # learned | rope
  m.rope_theta = 10000.0
  m.mlp = 'gelu'  # gelu (exact erf) | swiglu
  m.tied_embeddings = True  # output projection = input embedding transposed
  m.use_bias = True  # biases in projections and LayerNorm
  m.dtype = 'float32'  # compute dtype (bfloat16 on GPU/TPU); logits, softmax and loss stay float32
  m.param_dtype = 'float32'  # master weights and optimizer state
  m.scan_layers = False  # nn.scan over layers: compile time flat in depth
  m.remat = 'none'  # none | full | save_dots | save_proj (see lmjax/model.py REMAT_POLICIES)
  m.attention = 'xla'  # xla | dot_product_attention | cudnn | splash | auto (see lmjax/attention.py)
  m.attention_chunk = -1  # 'xla': queries in causal chunks of this length (-1 auto: CPU from length 128; 0 off)

  c.data = d = ml_collections.ConfigDict()
  d.dataset = 'tiny_shakespeare'  # a TFDS name (lm1b, c4/en, ...) read from array_record without TF; or text_files
  d.train_split = 'train'  # a TFDS split ('train[:90%]' works); for text_files, a glob of files ('/data/*.txt')
  d.eval_split = 'validation+test'  # for tiny_shakespeare, the last 10% of the text: nanoGPT's val split
  d.feature = 'text'  # the TFDS feature holding the text
  d.file_docs = 'file'  # text_files: one document per 'file' or per non-empty 'line'
  d.data_dir = ''  # TFDS data_dir ('' = ~/tensorflow_datasets); may be gs://... on a TPU VM
  d.manual_dir = ''  # a folder holding the raw files for machines without internet ('' = TFDS's default)
  d.rows = 'windows'  # windows: continuous text cut into random windows (nanoGPT) | packed: documents, shuffled,
  #                     tokenized and packed into rows with segment_ids / positions (see lmjax/data.py)
  d.window_stride = 1  # windows: a training row may start at any multiple of this offset
  d.read_threads = 2  # packed: Grain threads reading and tokenizing documents ahead of the train step
  d.tokenizer = 'char'  # char | byte | spm (SentencePiece; see lmjax/tokenizers.py for the special ids)
  d.spm_vocab_size = 8000  # spm: pieces, including 4 specials, newline and 256 byte-fallback pieces
  d.spm_model_type = 'bpe'  # spm: bpe | unigram
  d.spm_train_chars = 10_000_000  # spm: train on at most this many characters of the train split (shuffled docs)
  d.spm_model = ''  # spm: an existing .model file (pad=0 unk=1 bos=2 eos=3) to use instead of training one
  d.tokenizer_dir = ''  # spm: where trained models are cached and reused across runs ('' = the run's workdir)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 2000
  t.batch_size = 12  # global batch, in rows of model.max_len tokens
  t.grad_accum = 1  # micro-batches per step; batch_size must be divisible by it
  # The three intervals below: steps between events, which also happen at the last step; 0 = only at the last step.
  t.log_every = 50  # train-loss / tokens-per-second / MFU lines
  t.eval_every = 250  # evaluations over the whole eval split
  t.eval_batch_size = 64
  t.eval_max_batches = 0  # 0 = the whole eval split
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.peak_flops = 0.0  # per device, for MFU; 0 = look the device up in lmjax/metrics.py PEAK_FLOPS
  t.progress_bar = True  # shown only when stdout is a terminal
  # '' = off. A directory holds JAX's persistent compilation cache and lmjax's own cache of the train-step and init
  # executables (keyed on lmjax's source and the config: runtime.ExecutableCache), so a repeated or resumed run
  # neither traces nor compiles them.
  t.compilation_cache_dir = ''
  t.steps_per_call = 1  # optimizer steps per jitted call (lax.scan over K batches): less per-call overhead

  c.optimizer = o = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | lion | adafactor | muon
  o.lr = 1e-3  # peak learning rate
  o.warmup_steps = 100  # linear from 0 to lr
  o.decay_steps = 0  # cosine from lr to min_lr over this many steps after warmup ends... 0 = until train.steps
  o.min_lr = 1e-4
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-8
  o.weight_decay = 0.1  # decoupled; applied to weight matrices only (projections and MLP kernels)
  o.decay_embeddings = False  # also decay the token and position embeddings (nanoGPT does; GPT-3/Llama don't)
  o.grad_clip = 1.0  # global-norm clipping; 0 = off

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # -1 = all devices not used by the other axes
  ms.fsdp = 1
  ms.tensor = 1
  ms.rules = ()  # overrides of lmjax/parallel.py RULES, e.g. (('embed', None), ('mlp', ('fsdp', 'tensor')))

  c.sample = s = ml_collections.ConfigDict()  # defaults for `lmjax sample`
  s.prompt = '\n'
  s.max_new_tokens = 500
  s.temperature = 0.8
  s.top_k = 200
  s.top_p = 1.0
  s.min_p = 0.0  # 0 = off; keeps tokens with p >= min_p * the top token's p
  s.num_samples = 1
  s.beam_size = 1  # > 1 runs beam search (no sliding window: prompt + max_new_tokens must fit max_len)
  s.stop = ()  # cut a sample before the first of these strings, e.g. --config.sample.stop="('\\n\\n',)"
  s.sliding_window = True  # prompt + max_new_tokens over max_len: generate in chunks, re-reading the last tokens
  s.window_chunk = 0  # tokens per sliding chunk (0 = max_len // 4): smaller = more context per token, more prefills
  return c


def model_config(config):
  """The model's frozen dataclass from the experiment config (vocab size already filled in)."""
  from lmjax.model import ModelConfig
  return ModelConfig(**config.model.to_dict()).validate()


# ---------------------------------------------------------------------------------------------- loading


def load(path_and_arg: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` and applies `a.b=value` overrides; the result is locked against new keys."""
  path, _, arg = path_and_arg.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} not found (expected a Python file such as configs/shakespeare_char_cpu.py)')
  spec = importlib.util.spec_from_file_location(f'lmjax_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(); a config file returns its ConfigDict from get_config(arg=None)')
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  config.lock()
  return config


def apply_overrides(config, overrides=()):
  """Applies `a.b=value` strings in order (see set_value)."""
  for item in overrides:
    key, eq, value = item.partition('=')
    if not eq:
      raise ConfigError(f'override {item!r} has no value; write --config.{key}=VALUE')
    set_value(config, key, value)


def _leaf_keys(config, prefix=''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaf_keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def set_value(config, key: str, text: str):
  """Sets config[key] from the string `text`, parsed to the type of the field's current value."""
  valid = list(_leaf_keys(config))
  if key not in valid:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f'did you mean {" or ".join(close)}?' if close else f'valid keys: {", ".join(valid)}'
    raise ConfigError(f'unknown config key {key!r}; {hint}')
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = _parse(key, text, old)


def _parse(key, text, old):
  kind = type(old)
  try:
    if kind is bool:
      low = text.lower()
      if low in ('true', '1', 'yes'):
        return True
      if low in ('false', '0', 'no'):
        return False
      raise ValueError
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
    value = ast.literal_eval(text)
    if old is not None and kind in (tuple, list):
      return kind(value)
    return value
  except (ValueError, SyntaxError):
    raise ConfigError(f'--config.{key}={text!r}: expected {kind.__name__} (like the default {old!r})') from None


_SAVED = 'config.json'


def save(config, workdir: str) -> str:
  """Writes the resolved config as JSON into the workdir: what this run actually used."""
  path = os.path.join(workdir, _SAVED)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_saved(workdir: str, overrides=()) -> ml_collections.ConfigDict:
  """The config a workdir's run recorded (see save), with `a.b=value` overrides applied."""
  path = os.path.join(workdir, _SAVED)
  if not os.path.exists(path):
    raise ConfigError(f'{workdir} holds no {_SAVED}: is it the --workdir of an `lmjax train` run?')
  with open(path) as f:
    config = from_dict(json.load(f))
  apply_overrides(config, overrides)
  return config


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """The config a workdir recorded, on top of today's defaults (so fields added since still have a value)."""
  config = default_config()
  _merge(config, d)
  return config


def _merge(config, d):
  for k, v in d.items():
    if isinstance(v, dict) and k in config and isinstance(config[k], ml_collections.ConfigDict):
      _merge(config[k], v)
    else:
      with config.unlocked():
        config[k] = v
