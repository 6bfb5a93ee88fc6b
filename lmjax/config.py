"""Experiment configs: every field with its default and meaning, the model's schema, loading a config file,
command-line overrides, and the one validation pass.

A config file in configs/ defines `get_config(arg=None)` that starts from `default_config()` and changes what the
experiment changes. `--config=configs/x.py:variant` passes 'variant' as `arg` (one file, a family of ablations).
`--config.a.b=value` overrides a field; the value is parsed to the field's type and an unknown key is an error
that names the closest valid keys. `validate(config)` checks the whole config at once, before any data is read.

Near the bottom of the imports: this module imports nothing of lmjax but the error classes and the grammar of
eval-task strings (lmjax/evals/spec.py, which imports only the errors), so every other module can import it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os

import ml_collections

from lmjax.errors import ConfigError  # noqa: F401  -- re-exported: `config.ConfigError` is the same class
from lmjax.evals import spec as eval_spec

# The names each choice accepts: the modules that implement them assert they implement exactly these.
NORMS = ('layernorm', 'rmsnorm')
POSITIONS = ('learned', 'rope')
MLPS = ('gelu', 'gelu_tanh', 'swiglu', 'geglu')
GATED_MLPS = ('swiglu', 'geglu')  # a gate projection beside the up projection
ROPE_SCALINGS = ('none', 'llama3')
REMAT = ('none', 'full', 'save_dots', 'save_proj')  # lmjax/model.py REMAT_POLICIES
ATTENTION = ('xla', 'dot_product_attention', 'cudnn', 'splash', 'auto')  # lmjax/attention.py
UNCAPPED_ATTENTION = ('dot_product_attention', 'cudnn')  # kernels with no attention soft-cap (model.attn_softcap)
WINDOWLESS_ATTENTION = ('cudnn', 'splash')  # kernels lmjax does not give a sliding window (model.attn_window)
OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'muon')  # lmjax/optim.py
SCHEDULES = ('cosine', 'linear', 'constant', 'inverse_sqrt', 'wsd')  # lmjax/optim.py schedule
COOLDOWN_SHAPES = ('linear', 'cosine', '1-sqrt')  # optimizer.cooldown_shape (wsd)
ROWS = ('windows', 'packed')  # lmjax/data.py
TOKENIZERS = ('char', 'byte', 'spm', 'hf')  # lmjax/tokenizers.py
JSONL = 'jsonl'  # data.dataset of prompt/completion pairs (lmjax/sources.py)
CHAT = 'chat'  # data.dataset of conversations, rendered with the chat template (lmjax/chat.py)
TABLES = ('parquet', 'arrow')  # data.dataset of local Parquet / Arrow files with a text column (lmjax/sources.py)
# What one entry of data.sources may set: its name and weight, and the data fields saying where its documents are
# (unset ones are data.*'s). Tokenizer fields may be stated, but must equal data.*'s: a mixture shares one tokenizer.
SOURCE_FIELDS = ('dataset', 'train_split', 'eval_split', 'feature', 'file_docs', 'data_dir', 'manual_dir')
TOKENIZER_FIELDS = ('tokenizer', 'hf_tokenizer', 'spm_model', 'spm_vocab_size', 'spm_model_type')
DTYPES = ('float32', 'bfloat16', 'float16')
# optimizer.lr_multipliers / wd_multipliers: every parameter is in one group (lmjax/optim.py param_group)
PARAM_GROUPS = ('embeddings', 'norms', 'biases', 'attention', 'mlp', 'head')
PARAMS = ('raw', 'ema')  # --params of eval, sample and export-hf: the trained parameters or their EMA (train.ema_decay)
TRACKERS = ('jsonl', 'tensorboard', 'wandb')  # train.trackers (lmjax/sinks.py)
WANDB_MODES = ('online', 'offline', 'disabled')
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # lora.targets (lmjax/lora.py)


# What each model field is to a checkpoint, tagged on the field (ModelConfig below); `fields(role)` lists them.
ARCH = 'architecture'  # the parameters' shapes and meaning: train.init_from takes these from its source
LENGTH = 'length'  # max_len: architecture with learned positions (the table's length), free with rope
LAYOUT = 'layout'  # how the same parameters are stored (stacked layers, master dtype): a restore needs the same
RUNTIME = 'runtime'  # how the parameters are run (dropout, precision, kernel, remat): may change on resume
ROLES = (ARCH, LENGTH, LAYOUT, RUNTIME)


def _field(default, role: str):
  return dataclasses.field(default=default, metadata={'role': role})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's fields, declared once: `default_config().model` is built from these defaults, and the model
  reads this frozen dataclass (`model_config(config)`). A new model option is one field here, tagged with what it
  is to a checkpoint (ARCH, LENGTH, LAYOUT or RUNTIME), one check in `problems`, and its use in lmjax/model.py."""

  vocab_size: int = _field(0, ARCH)  # 0 = the tokenizer's vocabulary size (filled in before the model is built)
  max_len: int = _field(64, LENGTH)  # context length; training rows are this long
  n_layers: int = _field(4, ARCH)
  n_heads: int = _field(4, ARCH)
  n_kv_heads: int = _field(0, ARCH)  # 0 = n_heads (multi-head); 1 = multi-query; otherwise grouped-query
  d_model: int = _field(128, ARCH)
  d_ff: int = _field(0, ARCH)  # 0 = 4 * d_model
  head_dim: int = _field(0, ARCH)  # per-head width; 0 = d_model // n_heads (Gemma and Qwen3 set it apart)
  dropout: float = _field(0.0, RUNTIME)  # on embeddings, attention weights and both residual branches (as nanoGPT)
  norm: str = _field('layernorm', ARCH)  # layernorm | rmsnorm
  norm_eps: float = _field(1e-5, ARCH)
  positions: str = _field('learned', ARCH)  # learned | rope
  rope_theta: float = _field(10000.0, ARCH)
  # 'llama3': Llama 3.1's rescaled rotary frequencies (long wavelengths divided by rope_factor, a smooth blend
  # between the low and high frequency cut-offs, measured in rope_original_max_len positions); 'none' = plain RoPE.
  rope_scaling: str = _field('none', ARCH)
  rope_factor: float = _field(8.0, ARCH)
  rope_low_freq_factor: float = _field(1.0, ARCH)
  rope_high_freq_factor: float = _field(4.0, ARCH)
  rope_original_max_len: int = _field(8192, ARCH)
  # gelu (exact erf, as nanoGPT) | gelu_tanh (GPT-2's tanh approximation, HF's gelu_new) | swiglu | geglu (a
  # tanh-GELU gate, Gemma)
  mlp: str = _field('gelu', ARCH)
  tied_embeddings: bool = _field(True, ARCH)  # output projection = input embedding transposed
  use_bias: bool = _field(True, ARCH)  # biases in projections and LayerNorm
  qkv_bias: bool = _field(False, ARCH)  # biases on the q, k and v projections only, with use_bias off (Qwen2)
  # Norms scale by (1 + w) with w initialised to 0 (Gemma): the stored weight is w, so weight decay pulls the scale
  # towards 1, not 0. Applies to every norm, QK-norm included.
  norm_offset: bool = _field(False, ARCH)
  embed_scale: bool = _field(False, ARCH)  # embeddings times sqrt(d_model), in the compute dtype (Gemma)
  # Gemma 2/3's sandwich norm: the attention and MLP outputs are normed again before the residual add.
  post_norms: bool = _field(False, ARCH)
  # Attention scores scaled by 1/sqrt(this) instead of 1/sqrt(head dim) (Gemma's query_pre_attn_scalar); 0 = head dim.
  query_pre_attn_scalar: float = _field(0.0, ARCH)
  # Sliding-window attention (Mistral, Gemma): a query sees itself and the attn_window - 1 keys before it; 0 = off.
  # global_every N > 0: layers N, 2N, ... (1-based) attend globally and the rest are windowed (Gemma 2: 2, Gemma 3:
  # 6); 0 = every layer is windowed (Mistral). rope_local_theta: the windowed layers' RoPE base (Gemma 3), 0 = rope_theta.
  attn_window: int = _field(0, ARCH)
  global_every: int = _field(0, ARCH)
  rope_local_theta: float = _field(0.0, ARCH)
  # Stability (OLMo 2, Qwen3, Gemma 2/3); off by default. qk_norm: RMSNorm with a learned scale over each head's
  # q and k, before RoPE (as Qwen3 and Gemma 3), so attention logits cannot grow with the weights' norm.
  qk_norm: bool = _field(False, ARCH)
  # Soft-caps, x -> cap * tanh(x / cap) (Gemma 2): attention scores (after the 1/sqrt(K) scale, before the mask)
  # and final logits stay within (-cap, cap); 0 = off. 'cudnn' and 'dot_product_attention' cannot cap scores.
  attn_softcap: float = _field(0.0, ARCH)
  final_softcap: float = _field(0.0, ARCH)
  # compute dtype (bfloat16 on GPU/TPU); logits, softmax and loss stay float32
  dtype: str = _field('float32', RUNTIME)
  param_dtype: str = _field('float32', LAYOUT)  # master weights and optimizer state
  scan_layers: bool = _field(False, LAYOUT)  # nn.scan over layers: compile time flat in depth
  remat: str = _field('none', RUNTIME)  # none | full | save_dots | save_proj (see lmjax/model.py REMAT_POLICIES)
  attention: str = _field(
    'xla', RUNTIME
  )  # xla | dot_product_attention | cudnn | splash | auto (see lmjax/attention.py)
  attention_chunk: int = _field(
    -1, RUNTIME
  )  # 'xla': queries in causal chunks of this length (-1 auto: CPU from length 128; 0 off)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    """The per-head width K: model.head_dim, or d_model // n_heads when it is 0."""
    return self.head_dim or self.d_model // self.n_heads

  def is_local(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) attends within model.attn_window rather than to the whole context."""
    return self.attn_window > 0 and not (self.global_every and (layer + 1) % self.global_every == 0)

  @property
  def attention_scale(self) -> float:
    """What the scores q.k are multiplied by: 1/sqrt(query_pre_attn_scalar), or 1/sqrt(head size)."""
    return (self.query_pre_attn_scalar or self.head_size) ** -0.5

  @property
  def ff_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  def problems(self, need_vocab: bool = True) -> list[str]:
    """Every field that cannot be used, as 'model.FIELD ...: how to fix it' lines (empty when all is well)."""
    out = []

    def need(ok, msg):
      if not ok:
        out.append(f'model.{msg}')

    def one_of(field, names):
      value = getattr(self, field)
      need(value in names, f'{field} must be one of {", ".join(names)}; got {value!r}')

    if need_vocab:
      need(self.vocab_size > 0, f'vocab_size must be > 0, got {self.vocab_size}')
    need(self.vocab_size >= 0, f"vocab_size must be >= 0 (0 = the tokenizer's size), got {self.vocab_size}")
    for field in ('max_len', 'n_layers', 'n_heads', 'd_model'):
      need(getattr(self, field) > 0, f'{field} must be > 0, got {getattr(self, field)}')
    need(
      min(self.n_kv_heads, self.d_ff, self.head_dim) >= 0,
      f'n_kv_heads, d_ff and head_dim must be >= 0 (0 = the default), got {self.n_kv_heads}, {self.d_ff} and '
      f'{self.head_dim}',
    )
    if self.n_heads > 0 and self.n_kv_heads >= 0 and self.head_dim >= 0:
      need(
        self.head_dim or self.d_model % self.n_heads == 0,
        f'd_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set model.head_dim',
      )
      need(self.n_heads % self.kv_heads == 0, f'n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})')
      need(
        self.positions != 'rope' or self.head_size % 2 == 0,
        f"positions='rope' needs an even head dim (model.head_dim or d_model / n_heads), got {self.head_size}",
      )
    one_of('norm', NORMS)
    one_of('positions', POSITIONS)
    one_of('mlp', MLPS)
    one_of('rope_scaling', ROPE_SCALINGS)
    if self.rope_scaling == 'llama3':
      need(
        self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
        'rope_factor must be > 0 and 0 < rope_low_freq_factor < rope_high_freq_factor, got '
        f'{self.rope_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor}',
      )
      need(self.rope_original_max_len > 0, f'rope_original_max_len must be > 0, got {self.rope_original_max_len}')
    one_of('remat', REMAT)
    one_of('attention', ATTENTION)
    one_of('dtype', DTYPES)
    one_of('param_dtype', DTYPES)
    need(0.0 <= self.dropout < 1.0, f'dropout must be in [0, 1), got {self.dropout}')
    need(
      self.attention not in ('cudnn', 'splash') or self.dropout == 0,
      f"attention={self.attention!r} has no attention dropout: set model.dropout=0 or model.attention='xla' or 'auto'",
    )
    need(
      self.attention != 'splash' or self.max_len % 128 == 0,
      f"attention='splash' works in tiles of 128: max_len must be a multiple of 128, got {self.max_len}",
    )
    need(
      self.attention_chunk >= -1, f'attention_chunk must be -1 (auto), 0 (off) or a length, got {self.attention_chunk}'
    )
    need(self.norm_eps > 0, f'norm_eps must be > 0, got {self.norm_eps}')
    need(
      self.attn_softcap >= 0 and self.final_softcap >= 0,
      f'attn_softcap and final_softcap must be >= 0 (0 = off), got {self.attn_softcap} and {self.final_softcap}',
    )
    need(
      self.attention not in UNCAPPED_ATTENTION or not self.attn_softcap,
      f"attention={self.attention!r} cannot soft-cap attention scores: set model.attention='xla', 'splash' or 'auto', "
      'or model.attn_softcap=0',
    )
    need(
      not (self.qkv_bias and self.use_bias),
      'qkv_bias adds q/k/v biases to a model without use_bias; with use_bias=True they are there already: set one',
    )
    need(
      self.query_pre_attn_scalar >= 0,
      f'query_pre_attn_scalar must be >= 0 (0 = head dim), got {self.query_pre_attn_scalar}',
    )
    need(
      min(self.attn_window, self.global_every) >= 0 and self.rope_local_theta >= 0,
      'attn_window, global_every and rope_local_theta must be >= 0 (0 = off), got '
      f'{self.attn_window}, {self.global_every} and {self.rope_local_theta}',
    )
    need(
      self.attention not in WINDOWLESS_ATTENTION or not self.attn_window,
      f"attention={self.attention!r} has no sliding window here: set model.attention='xla', "
      "'dot_product_attention' or 'auto', or model.attn_window=0",
    )
    return out

  def validate(self):
    """Raises ConfigError naming every offending field; returns self."""
    problems = self.problems()
    if problems:
      raise ConfigError('; '.join(problems))
    return self


def fields(*roles: str) -> tuple[str, ...]:
  """The ModelConfig fields tagged with any of `roles`, in declaration order."""
  return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata['role'] in roles)


def architecture_fields(positions: str) -> tuple[str, ...]:
  """What a checkpoint's parameters depend on: the ARCH fields, and max_len with learned positions."""
  return fields(ARCH) + (fields(LENGTH) if positions == 'learned' else ())


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for init, data order and dropout; the same seed and config give the same run

  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))  # fields and meanings: ModelConfig

  c.data = d = ml_collections.ConfigDict()
  # a TFDS name (lm1b, c4/en, ...) read from array_record without TF; text_files; or jsonl: prompt/completion
  # pairs, one JSON object per line, trained on packed rows with the loss on the completion only
  d.dataset = 'tiny_shakespeare'
  d.train_split = 'train'  # a TFDS split ('train[:90%]' works); text_files and jsonl: a glob of files ('/data/*.txt')
  d.eval_split = 'validation+test'  # for tiny_shakespeare, the last 10% of the text: nanoGPT's val split
  d.feature = 'text'  # the TFDS feature holding the text
  d.file_docs = 'file'  # text_files: one document per 'file' or per non-empty 'line'
  d.prompt_field = 'prompt'  # jsonl: the keys of each line's prompt and completion (the loss covers the completion)
  d.completion_field = 'completion'
  # chat: JSONL of {"messages": [{"role", "content"}, ...]}, rendered with this Jinja template (a .jinja file or
  # the text) or, '' = the tokenizer's own (tokenizer_config.json); the loss covers the assistant turns only
  d.chat_template = ''
  d.data_dir = ''  # TFDS data_dir ('' = ~/tensorflow_datasets); may be gs://... on a TPU VM
  d.manual_dir = ''  # a folder holding the raw files for machines without internet ('' = TFDS's default)
  d.rows = 'windows'  # windows: continuous text cut into random windows (nanoGPT) | packed: documents, shuffled,
  #                     tokenized and packed into rows with segment_ids / positions (see lmjax/data.py)
  d.window_stride = 1  # windows: a training row may start at any multiple of this offset
  d.read_threads = 2  # packed: Grain threads reading and tokenizing documents ahead of the train step
  d.tokenizer = 'char'  # char | byte | spm (SentencePiece) | hf (a tokenizer.json); lmjax/tokenizers.py: special ids
  d.hf_tokenizer = ''  # hf: a tokenizer.json, or a directory holding one (an imported run brings its own)
  d.spm_vocab_size = 8000  # spm: pieces, including 4 specials, newline and 256 byte-fallback pieces
  d.spm_model_type = 'bpe'  # spm: bpe | unigram
  d.spm_train_chars = 10_000_000  # spm: train on at most this many characters of the train split (shuffled docs)
  d.spm_model = ''  # spm: an existing .model file (pad=0 unk=1 bos=2 eos=3) to use instead of training one
  d.tokenizer_dir = ''  # spm: where trained models are cached and reused across runs ('' = the run's workdir)
  # A mixture: () = the one dataset above. Else named sources, each a dict with 'name', 'weight' and any of
  # SOURCE_FIELDS, e.g. ({'name': 'books', 'weight': 0.7}, {'name': 'web', 'weight': 0.3, 'dataset': 'parquet',
  # 'train_split': '/data/web/*.parquet', 'eval_split': ''}); rows are drawn from them by weight (lmjax/mixture.py).
  # An eval_split of '' evaluates nothing of that source; the others are logged as val_loss/NAME, val_bpb/NAME.
  d.sources = ()
  # Stages: ((STEP, {NAME: WEIGHT, ...}), ...), steps increasing: from STEP on, rows are drawn with these weights
  # (a name left out weighs 0; a stage at step 0 replaces the sources' own weights, which is what a sweep over
  # weights varies). A resumed run may change stages that have not started.
  d.mixture_schedule = ()

  c.train = t = ml_collections.ConfigDict()
  t.steps = 2000
  t.epochs = 0.0  # > 0: train for this many passes over the train split instead (train.steps is computed from it)
  t.batch_size = 12  # global batch, in rows of model.max_len tokens
  t.grad_accum = 1  # micro-batches per step; batch_size must be divisible by it
  # PaLM's z-loss: adds z_loss * mean(log Z^2) (Z the softmax normaliser) to the loss, keeping logits from drifting
  # (1e-4 is PaLM's); 0 = off. Logged as z_loss, the term added; train_loss stays the cross-entropy.
  t.z_loss = 0.0
  # 0 = off. An exponential moving average of the parameters, ema = d * ema + (1 - d) * params after every step
  # (0.999 averages over ~1000 steps), saved in the checkpoint's optimizer state. Evaluations also log it as
  # ema_val_loss (...); `lmjax eval`, `sample` and `export-hf` read it with --params=ema.
  t.ema_decay = 0.0
  # The three intervals below: steps between events, which also happen at the last step; 0 = only at the last step.
  t.log_every = 50  # train-loss / tokens-per-second / MFU lines
  t.eval_every = 250  # evaluations over the whole eval split
  t.eval_batch_size = 64
  t.eval_max_batches = 0  # 0 = the whole eval split
  # Evaluation tasks run as a periodic action (at eval_every, or a task's own every=N), e.g.
  # ('mc:data/hellaswag_val.jsonl,limit=500', 'ppl:test'); the syntax is lmjax/evals/spec.py's. Numbers are logged as
  # NAME/METRIC (hellaswag_val/acc_norm).
  t.eval_tasks = ()
  t.checkpoint_every = 500
  t.keep_checkpoints = 3  # the last N checkpoints are kept; older ones are deleted
  t.keep_best = ''  # '' = off; a metric (val_loss, val_ppl, val_bpb): its best checkpoint is kept in WORKDIR/best/
  # A loss, gradient norm or updated parameter that is not finite: 'stop' ends the run naming the step (no state
  # after it is saved); 'skip' drops that update, counts it in the metrics, and stops after max_skipped in a row.
  t.nonfinite = 'stop'
  t.max_skipped = 10
  t.checkpoint_minutes = 0.0  # 0 = off; also checkpoint when this many minutes passed since the last save
  # '' = a fresh init. WORKDIR or WORKDIR:STEP of another run (`lmjax import-hf` makes one from a Hugging Face
  # model), or hf:DIR (a saved transformers model, converted on the fly): start from its parameters, with its
  # architecture and tokenizer, a fresh optimizer state, and this config's schedule, data, dropout and precision.
  # Fine-tuning and continued pre-training are this one field.
  t.init_from = ''
  # '' = off. WORKDIR:STEP of another lmjax run: this new workdir starts from that run's exact state at STEP
  # (parameters, optimizer state, data-iterator position, step counter) and goes on with this config's schedule,
  # e.g. one cooldown of a wsd run's stable phase (docs/recipes.md). The model, the optimizer's structure, the data
  # and the seed must be the source's (checked before anything is read); recorded in checkpoints and provenance.
  t.branch_from = ''
  t.peak_flops = 0.0  # per device, for MFU; 0 = look the device up in lmjax/metrics.py PEAK_FLOPS
  t.progress_bar = True  # shown only when stdout is a terminal
  # Where metrics go, comma-separated: jsonl (WORKDIR/metrics.jsonl, which compare and sweeps read), tensorboard,
  # wandb (Weights & Biases, `pip install 'lmjax[wandb]'`, settings in wandb.* below). lmjax/sinks.py.
  t.trackers = 'jsonl,tensorboard'
  # '' = off. A directory holds JAX's persistent compilation cache and lmjax's own cache of the train-step and init
  # executables (keyed on lmjax's source and the config: compiling.ExecutableCache), so a repeated or resumed run
  # neither traces nor compiles them.
  t.compilation_cache_dir = ''
  # (first, count): a jax.profiler trace of steps first + 1 ... first + count in WORKDIR/profile (lmjax/profiling.py
  # says how to open it); (0, 0) = off.
  t.profile_steps = (0, 0)
  t.steps_per_call = 1  # optimizer steps per jitted call (lax.scan over S batches): less per-call overhead

  # LoRA (lmjax/lora.py): rank 0 = off, every parameter trains. rank > 0 freezes the base (train.init_from, needed)
  # and trains adapters A (in x rank) and B (rank x out) on each target; the model runs W + alpha / rank * A B.
  # The optimizer state and checkpoints hold the adapters only; `lmjax export-hf --peft` writes them for PEFT.
  c.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0
  lo.alpha = 16.0
  lo.dropout = 0.0  # drops input features of the adapter path (one mask per step and layer: lmjax/lora.py)
  lo.targets = ('q', 'k', 'v', 'o')  # of q, k, v, o, gate, up, down (GPT-2: no gate; c_attn holds q, k, v)

  c.optimizer = o = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | lion | adafactor | muon
  o.lr = 1e-3  # peak learning rate
  # After warmup: cosine | linear | constant | inverse_sqrt | wsd (warmup-stable-decay); lmjax/optim.py says each.
  # `lmjax schedule --config=...` prints (and with --png plots) the curve.
  o.schedule = 'cosine'
  o.warmup_steps = 100  # linear from 0 to lr
  o.decay_steps = 0  # cosine, linear and wsd: the decay ends (at min_lr) at this step; 0 = at train.steps
  o.min_lr = 1e-4
  o.cooldown_steps = 0  # wsd: the decay takes this many steps, the last before decay_steps; 0 = no decay
  o.cooldown_shape = 'linear'  # wsd: linear | cosine | 1-sqrt (MiniCPM, "Scaling Laws and Compute-Optimal...")
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-8
  o.weight_decay = 0.1  # decoupled; applied to weight matrices only (projections and MLP kernels)
  o.decay_embeddings = False  # also decay the token and position embeddings (nanoGPT does; GPT-3/Llama don't)
  o.grad_clip = 1.0  # global-norm clipping; 0 = off
  # Per parameter group (embeddings, norms, biases, attention, mlp, head; lmjax/optim.py param_group), e.g.
  # (('embeddings', 0.1), ('head', 0.5)): the group's updates are scaled by the multiplier (its learning rate and
  # its decoupled decay alike). A group named in wd_multipliers decays at weight_decay x multiplier, decayed by
  # default or not (('norms', 1.0) decays the norms); adamw and lion. A group that matches no parameter is an error.
  o.lr_multipliers = ()
  o.wd_multipliers = ()

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # -1 = all devices not used by the other axes
  ms.fsdp = 1
  ms.tensor = 1
  ms.slices = 1  # TPU slices over the data-center network (multi-slice): the data axis spans them (parallel.make_mesh)
  ms.rules = ()  # overrides of lmjax/parallel.py RULES, e.g. (('embed', None), ('mlp', ('fsdp', 'tensor')))

  c.wandb = w = ml_collections.ConfigDict()  # train.trackers with 'wandb': the W&B run (lmjax/sinks.py)
  w.project = 'lmjax'
  w.entity = ''  # '' = your default entity
  w.name = ''  # '' = the workdir's folder name
  w.group = ''  # e.g. the sweep's name, to see its members together
  w.tags = ()
  w.mode = 'online'  # online | offline (no network; `wandb sync` later) | disabled
  w.init_timeout_s = 30.0  # how long to wait for the W&B service before going on without it

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


def model_config(config) -> ModelConfig:
  """The model's frozen dataclass from the experiment config (vocab size already filled in)."""
  return ModelConfig(**config.model.to_dict()).validate()


# ---------------------------------------------------------------------------------------------- loading


def load_file(path: str, error, kind: str, example: str):
  """The module a user's Python file (a config or a sweep file) defines; `error` (a UserError class) names the
  file and what went wrong: missing, a syntax error, or an exception while it ran."""
  if not os.path.isfile(path):
    raise error(f'{kind} file {path!r} not found (expected a Python file such as {example})')
  spec = importlib.util.spec_from_file_location(f'lmjax_{kind}_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise error(f'{path} line {e.lineno}: {e.msg}; fix the {kind} file') from None
  except Exception as e:  # pylint: disable=broad-except  -- whatever a user's file raises, say where
    raise error(f'{path} failed to load: {type(e).__name__}: {e}') from None
  return module


def load(path_and_arg: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` and applies `a.b=value` overrides; the result is locked against new keys."""
  path, _, arg = path_and_arg.partition(':')
  module = load_file(path, ConfigError, 'config', 'configs/shakespeare_char_cpu.py')
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(); a config file returns its ConfigDict from get_config(arg=None)')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except TypeError as e:
    raise ConfigError(f'{path}:{arg} -- get_config() takes no variant here ({e}); drop the ":{arg}"') from None
  except (ValueError, KeyError, AssertionError) as e:
    what = e.args[0] if e.args else type(e).__name__
    raise ConfigError(f'{path}:{arg} -- {what}') from None
  apply_overrides(config, overrides)
  # Which keys the command line set, for checks that must tell "set to the default" from "not set" (init_from).
  object.__setattr__(config, '_lmjax_overridden', frozenset(o.partition('=')[0] for o in overrides))
  config.lock()
  validate(config)
  return config


def overridden(config) -> frozenset:
  """The keys `load`'s overrides set, whatever their values (a config not made by `load`: none)."""
  return getattr(config, '_lmjax_overridden', frozenset())


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
  except (ValueError, SyntaxError, TypeError):  # TypeError: a tuple field given a number
    raise ConfigError(f'--config.{key}={text!r}: expected {kind.__name__} (like the default {old!r})') from None


def problems(config) -> list[str]:
  """Every field of a whole config that cannot be used (empty when all is well). Needs no data, devices or mesh:
  what depends on those (batch over the mesh, the tokenizer's vocabulary) is checked where they are known."""
  out = ModelConfig(**config.model.to_dict()).problems(need_vocab=False)

  def need(ok, msg):
    if not ok:
      out.append(msg)

  t, o, d, s = config.train, config.optimizer, config.data, config.sample
  S = t.steps_per_call
  need(t.steps > 0, f'train.steps ({t.steps}) must be > 0')
  need(S > 0, f'train.steps_per_call must be > 0, got {S}')
  need(t.batch_size > 0, f'train.batch_size must be > 0, got {t.batch_size}')
  need(
    t.grad_accum > 0 and t.batch_size % max(t.grad_accum, 1) == 0,
    f'train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})',
  )
  need(t.eval_batch_size > 0, f'train.eval_batch_size must be > 0, got {t.eval_batch_size}')
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'steps'):
    if name == 'steps' and t.steps <= 0:
      continue
    if t[name] < 0:
      out.append(f'train.{name} ({t[name]}) must be >= 0 (0 = only at the last step)')
    elif S > 0 and t[name] % S:
      out.append(f'train.{name} ({t[name]}) must be a multiple of train.steps_per_call ({S})')
  need(t.keep_checkpoints >= 1, f'train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}')
  need(
    t.keep_best in ('',) + BEST_METRICS,
    f"train.keep_best must be '' (off) or one of {', '.join(BEST_METRICS)}; got {t.keep_best!r}",
  )
  prof = tuple(t.profile_steps)
  if len(prof) != 2 or not all(isinstance(x, int) and x >= 0 for x in prof):
    out.append(f'train.profile_steps must be (first, count), two ints >= 0; got {t.profile_steps!r}')
  elif S > 0 and (prof[0] % S or prof[1] % S):
    out.append(f'train.profile_steps {prof} must be multiples of train.steps_per_call ({S}): calls are traced whole')
  need(t.nonfinite in ('stop', 'skip'), f"train.nonfinite must be 'stop' or 'skip'; got {t.nonfinite!r}")
  need(t.max_skipped >= 1, f'train.max_skipped must be >= 1, got {t.max_skipped}')
  tasks = t.eval_tasks if isinstance(t.eval_tasks, (tuple, list)) else [t.eval_tasks]
  if not all(isinstance(task, str) for task in tasks):
    out.append(f'train.eval_tasks must be strings KIND:DATA[,KEY=VALUE...]; got {t.eval_tasks!r}')
  else:
    try:
      eval_spec.parse_all(tasks)  # the one parser of task texts (`lmjax eval --task` too); reads no file
    except ConfigError as e:
      out.append(f'train.eval_tasks: {e}')
  trackers = [x.strip() for x in t.trackers.split(',') if x.strip()]
  unknown = [x for x in trackers if x not in TRACKERS]
  need(
    not unknown, f'train.trackers: unknown {", ".join(unknown)}; choose from {", ".join(TRACKERS)} (comma-separated)'
  )
  need(
    config.wandb.mode in WANDB_MODES, f'wandb.mode must be one of {", ".join(WANDB_MODES)}; got {config.wandb.mode!r}'
  )
  if t.branch_from:
    head, _, tail = t.branch_from.rpartition(':')
    need(
      bool(head) and tail.isdigit(),
      f'train.branch_from must be WORKDIR:STEP, a step number of another run; got {t.branch_from!r}',
    )
    need(not t.init_from, 'train.branch_from and train.init_from both start a run from another: set only one')
  need(0 <= t.ema_decay < 1, f'train.ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}')
  need(t.z_loss >= 0, f'train.z_loss must be >= 0 (0 = off), got {t.z_loss}')
  need(t.checkpoint_minutes >= 0, f'train.checkpoint_minutes must be >= 0 (0 = off), got {t.checkpoint_minutes}')
  need(o.name in OPTIMIZERS, f'optimizer.name must be one of {", ".join(OPTIMIZERS)}; got {o.name!r}')
  need(o.lr > 0, f'optimizer.lr must be > 0, got {o.lr}')
  need(
    o.warmup_steps >= 0 and o.decay_steps >= 0,
    f'optimizer.warmup_steps and decay_steps must be >= 0, got {o.warmup_steps} and {o.decay_steps}',
  )
  need(o.schedule in SCHEDULES, f'optimizer.schedule must be one of {", ".join(SCHEDULES)}; got {o.schedule!r}')
  need(
    o.cooldown_shape in COOLDOWN_SHAPES,
    f'optimizer.cooldown_shape must be one of {", ".join(COOLDOWN_SHAPES)}; got {o.cooldown_shape!r}',
  )
  end = o.decay_steps or t.steps
  need(
    o.cooldown_steps >= 0 and (o.schedule != 'wsd' or not o.cooldown_steps or o.warmup_steps + o.cooldown_steps <= end),
    f'optimizer.cooldown_steps ({o.cooldown_steps}) must be >= 0 and, with warmup_steps ({o.warmup_steps}), fit in '
    f'the {end} steps the schedule decays over (optimizer.decay_steps, or train.steps)',
  )
  for field in ('lr_multipliers', 'wd_multipliers'):
    out.extend(_multiplier_problems(f'optimizer.{field}', o[field]))
  need(
    not o.wd_multipliers or o.name in ('adamw', 'lion'),
    f'optimizer.wd_multipliers works with adamw and lion, whose decay is one link of the chain; got {o.name!r}',
  )
  need(o.grad_clip >= 0, f'optimizer.grad_clip must be >= 0 (0 = off), got {o.grad_clip}')
  need(d.rows in ROWS, f'data.rows must be one of {", ".join(ROWS)}; got {d.rows!r}')
  need(d.tokenizer in TOKENIZERS, f'data.tokenizer must be one of {", ".join(TOKENIZERS)}; got {d.tokenizer!r}')
  need(d.file_docs in ('file', 'line'), f"data.file_docs must be 'file' or 'line'; got {d.file_docs!r}")
  need(d.window_stride > 0, f'data.window_stride must be > 0, got {d.window_stride}')
  for kind, what in ((JSONL, 'prompt/completion pairs'), (CHAT, 'conversations')):
    need(
      d.dataset != kind or d.rows == 'packed',
      f"data.dataset='{kind}' holds {what}, trained on packed rows: set --config.data.rows=packed",
    )
  need(t.epochs >= 0, f'train.epochs must be >= 0 (0 = train.steps decides), got {t.epochs}')
  out.extend(mixture_problems(d))
  need(not (d.sources and t.epochs), 'train.epochs counts passes over one dataset; with data.sources set train.steps')
  for axis in ('data', 'fsdp', 'tensor'):
    need(
      config.mesh[axis] == -1 or config.mesh[axis] > 0,
      f'mesh.{axis} must be a device count or -1 (the devices left over), got {config.mesh[axis]}',
    )
  leftover = [f'mesh.{a}' for a in ('data', 'fsdp', 'tensor') if config.mesh[a] == -1]
  need(
    len(leftover) <= 1,
    f'{" and ".join(leftover)} are both -1 (the devices left over); at most one axis may be -1: give the others counts',
  )
  need(config.mesh.get('slices', 1) >= 1, f'mesh.slices must be >= 1, got {config.mesh.get("slices", 1)}')
  out.extend(lora_problems(config))
  need(s.max_new_tokens >= 0, f'sample.max_new_tokens must be >= 0, got {s.max_new_tokens}')
  need(s.temperature >= 0, f'sample.temperature must be >= 0 (0 = greedy), got {s.temperature}')
  return out


def lora_problems(config) -> list[str]:
  """What is wrong with the lora section (empty when all is well). A target the model lacks is found once the
  architecture is known (lmjax/lora.py check_model)."""
  lc, t = config.get('lora'), config.train
  if lc is None:
    return []
  out = []
  explicit = {k for k in overridden(config) if k.startswith('lora.')} - {'lora.rank'}
  if lc.rank < 0 or (lc.rank == 0 and explicit):
    out.append(
      f'lora.rank must be > 0 to train adapters (0 = off, every parameter trains); got {lc.rank}'
      + (f' with {", ".join(sorted(explicit))} set' if lc.rank == 0 and explicit else '')
    )
  if lc.rank <= 0:
    return out
  targets = lc.targets if isinstance(lc.targets, (tuple, list)) else (lc.targets,)
  unknown = [x for x in targets if x not in LORA_TARGETS]
  if unknown or not targets:
    out.append(
      f'lora.targets: unknown {", ".join(map(repr, unknown)) or "(none given)"}; choose from {", ".join(LORA_TARGETS)}'
    )
  if len(set(targets)) != len(targets):
    out.append(f'lora.targets names a target twice: {tuple(targets)}')
  if not lc.alpha > 0:
    out.append(f'lora.alpha must be > 0, got {lc.alpha}')
  if not 0 <= lc.dropout < 1:
    out.append(f'lora.dropout must be in [0, 1), got {lc.dropout}')
  if not t.init_from:
    out.append('lora.rank > 0 trains adapters over a base: set train.init_from (WORKDIR or hf:DIR)')
  if t.branch_from:
    out.append('lora and train.branch_from cannot be combined; use train.init_from')
  for field, on in (
    ('train.ema_decay', t.ema_decay),
    ('optimizer.lr_multipliers', config.optimizer.lr_multipliers),
    ('optimizer.wd_multipliers', config.optimizer.wd_multipliers),
  ):
    if on:
      out.append(f'{field} works on full fine-tuning, not on lora adapters: unset it or set lora.rank=0')
  return out


def _multiplier_problems(field: str, pairs) -> list[str]:
  example = f"{field}=\"(('embeddings', 0.1), ('head', 2.0))\""
  if not isinstance(pairs, (tuple, list)) or not all(
    isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], (int, float))
    for p in pairs
  ):
    return [f'{field} must be (GROUP, MULTIPLIER) pairs, e.g. --config.{example}; got {pairs!r}']
  out = [
    f'{field}: unknown group {g!r}; the groups are {", ".join(PARAM_GROUPS)}' for g, _ in pairs if g not in PARAM_GROUPS
  ]
  out += [f'{field}: the multiplier of {g!r} must be >= 0, got {m}' for g, m in pairs if m < 0]
  names = [g for g, _ in pairs]
  out += [f'{field} names {g!r} twice' for g in sorted({g for g in names if names.count(g) > 1})]
  return out


def mixture_problems(d) -> list[str]:
  """What is wrong with data.sources and data.mixture_schedule (empty when all is well, or when they are unset)."""
  out, sources, schedule = [], d.get('sources', ()), d.get('mixture_schedule', ())
  if not sources:
    return ['data.mixture_schedule needs data.sources: stages change the weights of named sources'] if schedule else []
  if not isinstance(sources, (tuple, list)) or not all(isinstance(s, dict) for s in sources):
    return [f"data.sources must be dicts {{'name': ..., 'weight': ..., ...}}; got {sources!r}"]
  names = [s.get('name') for s in sources]
  for i, s in enumerate(sources):
    name = s.get('name')
    if not isinstance(name, str) or not name or '/' in name:
      out.append(f"data.sources[{i}] needs a 'name': a non-empty string without '/' (it names val_loss/NAME)")
    unknown = sorted(set(s) - {'name', 'weight', *SOURCE_FIELDS, *TOKENIZER_FIELDS})
    if unknown:
      out.append(
        f'data.sources[{i}] ({name}): unknown keys {unknown}; a source may set name, weight and '
        f'{", ".join(SOURCE_FIELDS)}'
      )
    for k in TOKENIZER_FIELDS:
      if k in s and s[k] != d[k]:
        out.append(
          f'data.sources[{i}] ({name}) has {k}={s[k]!r} but data.{k} is {d[k]!r}: the sources of a mixture '
          'share one tokenizer; remove the key or set data.' + k
        )
  dupes = sorted({n for n in names if names.count(n) > 1 and isinstance(n, str)})
  if dupes:
    out.append(f'data.sources: names must be unique; {dupes} repeat')
  out.extend(_weight_problems('data.sources', {s.get('name'): s.get('weight') for s in sources}))
  if not isinstance(schedule, (tuple, list)):
    return out + [f'data.mixture_schedule must be ((STEP, {{NAME: WEIGHT}}), ...); got {schedule!r}']
  last = -1
  for stage in schedule:
    if not (
      isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[0], int) and isinstance(stage[1], dict)
    ):
      out.append(f'data.mixture_schedule: each stage is (STEP, {{NAME: WEIGHT}}); got {stage!r}')
      continue
    step, weights = stage
    if step <= last:
      out.append(f'data.mixture_schedule: stage steps must be >= 0 and increasing; {step} follows {max(last, 0)}')
    last = max(last, step)
    unknown = sorted(set(weights) - set(names), key=str)
    if unknown:
      out.append(
        f'data.mixture_schedule: the stage at step {step} names unknown sources {unknown}; the sources are {names}'
      )
    out.extend(_weight_problems(f'data.mixture_schedule stage at step {step}', weights))
  return out


def _weight_problems(where: str, weights: dict) -> list[str]:
  bad = {n: w for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0}
  if bad:
    return [f'{where}: weights must be numbers >= 0; got {bad}']
  if not sum(weights.values()) > 0:
    return [f'{where}: the weights are all zero; give at least one source a weight > 0']
  return []


# Metrics train.keep_best can rank by; every one of them is better when lower.
BEST_METRICS = ('val_loss', 'val_ppl', 'val_bpb')


def validate(config):
  """Raises one ConfigError naming every bad field of `config` at once; returns the config."""
  found = problems(config)
  if found:
    raise ConfigError('; '.join(found))
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
