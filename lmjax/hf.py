"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM, as safetensors, with no torch.

`import_hf(DIR, WORKDIR)` reads a directory that `save_pretrained` wrote (config.json, model.safetensors or its
shards with model.safetensors.index.json, tokenizer.json) and writes a normal lmjax workdir: config.json, the
tokenizer (kind 'hf'), and a parameters-only checkpoint at step 0 that `lmjax sample`, `eval` and
`train.init_from` restore. `export_hf(WORKDIR, OUT)` writes the reverse: a directory `from_pretrained` loads.

How the weights map (lmjax/model.py names the parameters; D model width, H heads, N kv heads, K head dim):
  GPT-2  wte/wpe -> embed/pos_embed; c_attn (Conv1D, stored in x out, columns q|k|v) -> q_kernel (D,H,K) and
         kv_kernel (D,2,N,K); c_proj -> o_kernel (H,K,D); c_fc/c_proj -> up/down kernels; ln_1/ln_2/ln_f.
  Llama  torch Linear weights are out x in, so each is transposed; q/k/v_proj -> q_kernel and kv_kernel,
         o_proj -> o_kernel, gate/up/down_proj -> the SwiGLU kernels, RMSNorm weights -> scale, lm_head unless
         tied. HF's Llama rotates the two halves of each head (rotate_half), as lmjax's rope does: no permutation.
Every tensor is checked against the shape the config implies before anything is written: a missing, extra or
mis-shaped tensor is an error naming it and both shapes. Pickled pytorch_model.bin files are never opened.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import numpy as np

from lmjax import config as config_lib
from lmjax.config import ModelConfig
from lmjax.errors import InteropError

ARCHITECTURES = ('GPT2LMHeadModel', 'LlamaForCausalLM')
SAFETENSORS, INDEX = 'model.safetensors', 'model.safetensors.index.json'
# Tensors some writers add that hold no weights: GPT-2's causal-mask buffers, Llama's cached rotary frequencies.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')


# ---------------------------------------------------------------------------------------------- configs


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isdir(directory):
    raise InteropError(
      f'{directory} is not a directory. Give the directory save_pretrained wrote (on a machine with network, '
      'download a hub model first: huggingface-cli download gpt2 --local-dir DIR)'
    )
  if not os.path.exists(path):
    raise InteropError(f'{directory} holds no config.json; is it a directory written by save_pretrained?')
  with open(path) as f:
    return json.load(f)


def architecture(hf: dict) -> str:
  archs = hf.get('architectures') or []
  known = [a for a in archs if a in ARCHITECTURES]
  if not known:
    by_type = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}.get(hf.get('model_type'))
    if by_type and not archs:
      return by_type
    raise InteropError(
      f'architecture {", ".join(archs) or hf.get("model_type", "?")} is not supported; lmjax imports '
      f'{" and ".join(ARCHITECTURES)}'
    )
  return known[0]


def _rope(hf: dict) -> dict:
  """theta and scaling from either transformers layout: `rope_parameters` (v5) or rope_theta + rope_scaling (v4)."""
  params = dict(hf.get('rope_parameters') or {})
  if not params:
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  out = {'rope_theta': float(params.get('rope_theta', 10000.0))}
  if kind == 'llama3':
    out.update(
      rope_scaling='llama3',
      rope_factor=float(params['factor']),
      rope_low_freq_factor=float(params['low_freq_factor']),
      rope_high_freq_factor=float(params['high_freq_factor']),
      rope_original_max_len=int(params['original_max_position_embeddings']),
    )
  elif kind != 'default':
    raise InteropError(f"rope scaling {kind!r} is not supported; lmjax implements plain RoPE and 'llama3'")
  return out


def model_fields(hf: dict) -> dict:
  """The ModelConfig fields of an HF config (InteropError naming what lmjax cannot express)."""
  arch = architecture(hf)
  if arch == 'GPT2LMHeadModel':
    act = hf.get('activation_function', 'gelu_new')
    mlp = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}.get(act)
    unsupported = [
      f'{k}={hf[k]!r}'
      for k, ok in (
        ('scale_attn_by_inverse_layer_idx', False),
        ('scale_attn_weights', True),
        ('add_cross_attention', False),
      )
      if k in hf and hf[k] != ok
    ]
    if mlp is None:
      unsupported.append(f'activation_function={act!r} (lmjax has gelu_new and gelu)')
    if unsupported:
      raise InteropError(f'this GPT-2 config sets {", ".join(unsupported)}, which lmjax does not implement')
    d = hf['n_embd']
    return dict(
      vocab_size=hf['vocab_size'],
      max_len=hf['n_positions'],
      n_layers=hf['n_layer'],
      n_heads=hf['n_head'],
      n_kv_heads=0,
      d_model=d,
      d_ff=hf.get('n_inner') or 4 * d,
      norm='layernorm',
      norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
      positions='learned',
      mlp=mlp,
      tied_embeddings=bool(hf.get('tie_word_embeddings', True)),
      use_bias=True,
    )
  unsupported = [f'{k}=True' for k in ('attention_bias', 'mlp_bias') if hf.get(k)]
  if hf.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f'hidden_act={hf["hidden_act"]!r} (lmjax has silu, as SwiGLU)')
  if hf.get('pretraining_tp', 1) not in (1, None):
    unsupported.append(f'pretraining_tp={hf["pretraining_tp"]}')
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  if hf.get('head_dim') not in (None, d // heads):
    unsupported.append(f'head_dim={hf["head_dim"]} (lmjax uses hidden_size / num_attention_heads = {d // heads})')
  if unsupported:
    raise InteropError(f'this Llama config sets {", ".join(unsupported)}, which lmjax does not implement')
  return dict(
    vocab_size=hf['vocab_size'],
    max_len=hf['max_position_embeddings'],
    n_layers=hf['num_hidden_layers'],
    n_heads=heads,
    n_kv_heads=hf.get('num_key_value_heads') or heads,
    d_model=d,
    d_ff=hf['intermediate_size'],
    norm='rmsnorm',
    norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    positions='rope',
    mlp='swiglu',
    tied_embeddings=bool(hf.get('tie_word_embeddings', False)),
    use_bias=False,
    **_rope(hf),
  )


def hf_config(cfg: ModelConfig, tokenizer=None) -> dict:
  """The transformers config.json of an lmjax model; InteropError naming the fields HF's classes cannot express."""
  ids = {
    'bos_token_id': getattr(tokenizer, 'bos_id', None),
    'eos_token_id': getattr(tokenizer, 'eos_id', None),
    'pad_token_id': getattr(tokenizer, 'pad_id', None),
  }
  # each family's allowed values of the fields that decide it
  gpt2 = {'norm': ('layernorm',), 'positions': ('learned',), 'use_bias': (True,), 'mlp': ('gelu_tanh', 'gelu')}
  llama = {'norm': ('rmsnorm',), 'positions': ('rope',), 'use_bias': (False,), 'mlp': ('swiglu',)}

  def mismatches(want):
    out = [f'model.{k}={getattr(cfg, k)!r}' for k, ok in want.items() if getattr(cfg, k) not in ok]
    if want is gpt2 and cfg.kv_heads != cfg.n_heads:
      out.append(f'model.n_kv_heads={cfg.n_kv_heads} (GPT-2 has no grouped-query attention)')
    return out

  if not mismatches(gpt2):
    return {
      'architectures': ['GPT2LMHeadModel'],
      'model_type': 'gpt2',
      'vocab_size': cfg.vocab_size,
      'n_positions': cfg.max_len,
      'n_embd': cfg.d_model,
      'n_layer': cfg.n_layers,
      'n_head': cfg.n_heads,
      'n_inner': cfg.ff_dim,
      'activation_function': 'gelu_new' if cfg.mlp == 'gelu_tanh' else 'gelu',
      'layer_norm_epsilon': cfg.norm_eps,
      'tie_word_embeddings': cfg.tied_embeddings,
      'resid_pdrop': 0.0,
      'embd_pdrop': 0.0,
      'attn_pdrop': 0.0,
      'torch_dtype': 'float32',
      **ids,
    }
  if not mismatches(llama):
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if cfg.rope_scaling == 'llama3':
      rope.update(
        rope_type='llama3',
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_len,
      )
    return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': cfg.vocab_size,
      'max_position_embeddings': cfg.max_len,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.ff_dim,
      'num_hidden_layers': cfg.n_layers,
      'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.kv_heads,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tied_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      # both layouts: transformers 4.x reads rope_theta / rope_scaling, 5.x rope_parameters
      'rope_theta': cfg.rope_theta,
      'rope_scaling': rope if cfg.rope_scaling == 'llama3' else None,
      'rope_parameters': rope,
      'torch_dtype': 'float32',
      **ids,
    }
  raise InteropError(
    'this model has no Hugging Face class: GPT-2 needs '
    + ', '.join(mismatches(gpt2))
    + ' changed; Llama needs '
    + ', '.join(mismatches(llama))
    + ' changed (a GPT-2 is layernorm + learned positions + gelu_tanh or gelu + biases, no grouped-query '
    'attention; a Llama is rmsnorm + rope + swiglu without biases)'
  )


# ---------------------------------------------------------------------------------------------- tensors


def _safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    missing = [name for name in files if not os.path.exists(os.path.join(directory, name))]
    if missing:
      raise InteropError(f'{INDEX} in {directory} names shards that are missing: {", ".join(missing)}')
    return [os.path.join(directory, name) for name in files]
  single = os.path.join(directory, SAFETENSORS)
  if os.path.exists(single):
    return [single]
  pickled = [n for n in sorted(os.listdir(directory)) if n.endswith('.bin') or n.endswith('.pt')]
  if pickled:
    raise InteropError(
      f'{directory} holds only pickled weights ({", ".join(pickled)}); lmjax never unpickles downloaded files. '
      'Convert them once where you trust the file: python -c "import transformers as t; '
      f"t.AutoModelForCausalLM.from_pretrained('{directory}').save_pretrained('{directory}', "
      'safe_serialization=True)"'
    )
  raise InteropError(f'{directory} holds no {SAFETENSORS} (nor {INDEX}); save the model with save_pretrained')


class Tensors:
  """The tensors of a directory's safetensors files by name, each read from disk when asked for.

  The files are read with plain reads at the offsets their headers give (the safetensors layout: an 8-byte
  little-endian header size, a JSON header of dtype, shape and data_offsets per tensor, then the data). The
  `safetensors` library's reader memory-maps the whole file instead, and the mapped pages count as resident beside
  the converted copies: for GPT-2 124M that is the model's size once more at the peak. tests/test_hf.py checks this
  reader against the library's."""

  DTYPES = {'F32': np.float32, 'F16': np.float16, 'F64': np.float64, 'BF16': 'bfloat16'}

  def __init__(self, directory: str):
    self._where = {}  # name -> (path, dtype, shape, start byte, end byte)
    for path in _safetensors_files(directory):
      with open(path, 'rb') as f:
        try:
          (size,) = np.frombuffer(f.read(8), '<u8')
          header = json.loads(f.read(int(size)))
        except ValueError as e:
          raise InteropError(f'{path} is not a safetensors file ({e}); save the model again with save_pretrained')
      for name, info in header.items():
        if name != '__metadata__':
          begin, end = info['data_offsets']
          self._where[name] = (path, info['dtype'], tuple(info['shape']), 8 + int(size) + begin, 8 + int(size) + end)
    # The hub's original gpt2 files name tensors without the 'transformer.' prefix the model class adds.
    names = list(self._where)
    if any(n.startswith('h.') or n == 'wte.weight' for n in names) and not any(
      n.startswith('transformer.') for n in names
    ):
      self._where = {f'transformer.{n}': v for n, v in self._where.items()}

  def names(self) -> set:
    return set(self._where)

  def shape(self, name: str) -> tuple:
    return self._where[name][2]

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32."""
    path, dtype, shape, begin, end = self._where[name]
    if dtype not in self.DTYPES:
      raise InteropError(f'{name} in {path} is {dtype}; lmjax reads F32, F16, BF16 and F64 weights')
    kind = self.DTYPES[dtype]
    if kind == 'bfloat16':
      import ml_dtypes  # pylint: disable=import-outside-toplevel  -- JAX's own dependency

      kind = ml_dtypes.bfloat16
    with open(path, 'rb') as f:
      f.seek(begin)
      x = np.frombuffer(f.read(end - begin), kind).reshape(shape)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _expected(cfg: ModelConfig, arch: str) -> dict:
  """{HF tensor name: shape} that a model of this config has."""
  D, F, V, H, N, K = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  out = {}
  if arch == 'GPT2LMHeadModel':
    out.update({'transformer.wte.weight': (V, D), 'transformer.wpe.weight': (cfg.max_len, D)})
    for i in range(cfg.n_layers):
      p = f'transformer.h.{i}.'
      for name, shape in (
        ('ln_1.weight', (D,)),
        ('ln_1.bias', (D,)),
        ('attn.c_attn.weight', (D, 3 * D)),
        ('attn.c_attn.bias', (3 * D,)),
        ('attn.c_proj.weight', (D, D)),
        ('attn.c_proj.bias', (D,)),
        ('ln_2.weight', (D,)),
        ('ln_2.bias', (D,)),
        ('mlp.c_fc.weight', (D, F)),
        ('mlp.c_fc.bias', (F,)),
        ('mlp.c_proj.weight', (F, D)),
        ('mlp.c_proj.bias', (D,)),
      ):
        out[p + name] = shape
    out.update({'transformer.ln_f.weight': (D,), 'transformer.ln_f.bias': (D,)})
  else:
    out['model.embed_tokens.weight'] = (V, D)
    for i in range(cfg.n_layers):
      p = f'model.layers.{i}.'
      for name, shape in (
        ('input_layernorm.weight', (D,)),
        ('self_attn.q_proj.weight', (H * K, D)),
        ('self_attn.k_proj.weight', (N * K, D)),
        ('self_attn.v_proj.weight', (N * K, D)),
        ('self_attn.o_proj.weight', (D, H * K)),
        ('post_attention_layernorm.weight', (D,)),
        ('mlp.gate_proj.weight', (F, D)),
        ('mlp.up_proj.weight', (F, D)),
        ('mlp.down_proj.weight', (D, F)),
      ):
        out[p + name] = shape
    out['model.norm.weight'] = (D,)
  if not cfg.tied_embeddings:
    out['lm_head.weight'] = (V, D)
  return out


def _check_tensors(tensors: Tensors, cfg: ModelConfig, arch: str, where: str) -> None:
  want, have = _expected(cfg, arch), tensors.names()
  extra = sorted(n for n in have - set(want) if not n.endswith(_BUFFERS) and n != 'lm_head.weight')
  problems = [f'{n} is missing (expected shape {list(want[n])})' for n in sorted(set(want) - have)]
  problems += [f'{n} is not a tensor of {arch} as configured (shape {list(tensors.shape(n))})' for n in extra]
  problems += [
    f'{n} has shape {list(tensors.shape(n))}, expected {list(want[n])}'
    for n in sorted(set(want) & have)
    if tensors.shape(n) != want[n]
  ]
  if problems:
    shown = '; '.join(problems[:8]) + (f'; and {len(problems) - 8} more' if len(problems) > 8 else '')
    raise InteropError(f'the weights in {where} do not match its config.json ({arch}): {shown}')


def to_params(tensors: Tensors, cfg: ModelConfig, arch: str) -> dict:
  """lmjax's parameter tree (numpy float32) from an HF model's tensors."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  get = tensors.get
  params = {}
  if arch == 'GPT2LMHeadModel':
    params['embed'], params['pos_embed'] = get('transformer.wte.weight'), get('transformer.wpe.weight')
    for i in range(cfg.n_layers):
      t = lambda name: get(f'transformer.h.{i}.{name}')
      w, b = t('attn.c_attn.weight'), t('attn.c_attn.bias')
      params[f'block_{i}'] = {
        'ln1': {'scale': t('ln_1.weight'), 'bias': t('ln_1.bias')},
        'ln2': {'scale': t('ln_2.weight'), 'bias': t('ln_2.bias')},
        'attn': {
          'q_kernel': w[:, :D].reshape(D, H, K),
          'kv_kernel': np.stack([w[:, D : 2 * D].reshape(D, N, K), w[:, 2 * D :].reshape(D, N, K)], axis=1),
          'q_bias': b[:D].reshape(H, K),
          'kv_bias': np.stack([b[D : 2 * D].reshape(N, K), b[2 * D :].reshape(N, K)]),
          'o_kernel': t('attn.c_proj.weight').reshape(H, K, D),
          'o_bias': t('attn.c_proj.bias'),
        },
        'mlp': {
          'up_kernel': t('mlp.c_fc.weight'),
          'up_bias': t('mlp.c_fc.bias'),
          'down_kernel': t('mlp.c_proj.weight'),
          'down_bias': t('mlp.c_proj.bias'),
        },
      }
    params['ln_f'] = {'scale': get('transformer.ln_f.weight'), 'bias': get('transformer.ln_f.bias')}
  else:
    params['embed'] = get('model.embed_tokens.weight')
    for i in range(cfg.n_layers):
      t = lambda name: get(f'model.layers.{i}.{name}')
      k, v = t('self_attn.k_proj.weight').T.reshape(D, N, K), t('self_attn.v_proj.weight').T.reshape(D, N, K)
      params[f'block_{i}'] = {
        'ln1': {'scale': t('input_layernorm.weight')},
        'ln2': {'scale': t('post_attention_layernorm.weight')},
        'attn': {
          'q_kernel': np.ascontiguousarray(t('self_attn.q_proj.weight').T).reshape(D, H, K),
          'kv_kernel': np.stack([k, v], axis=1),
          'o_kernel': np.ascontiguousarray(t('self_attn.o_proj.weight').T).reshape(H, K, D),
        },
        'mlp': {
          'gate_kernel': np.ascontiguousarray(t('mlp.gate_proj.weight').T),
          'up_kernel': np.ascontiguousarray(t('mlp.up_proj.weight').T),
          'down_kernel': np.ascontiguousarray(t('mlp.down_proj.weight').T),
        },
      }
    params['ln_f'] = {'scale': get('model.norm.weight')}
  if not cfg.tied_embeddings:
    params['lm_head'] = np.ascontiguousarray(get('lm_head.weight').T)
  return params


def from_params(params: dict, cfg: ModelConfig, arch: str) -> Iterator[tuple[str, np.ndarray]]:
  """(HF tensor name, numpy array) pairs of lmjax parameters: the inverse of to_params."""
  D, H, N, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  if arch == 'GPT2LMHeadModel':
    yield 'transformer.wte.weight', a(params['embed'])
    yield 'transformer.wpe.weight', a(params['pos_embed'])
    for i in range(cfg.n_layers):
      p, blk = f'transformer.h.{i}.', params[f'block_{i}']
      at, mlp = blk['attn'], blk['mlp']
      kv, kvb = np.asarray(at['kv_kernel']), np.asarray(at['kv_bias'])
      w = np.concatenate(
        [np.asarray(at['q_kernel']).reshape(D, H * K), kv[:, 0].reshape(D, -1), kv[:, 1].reshape(D, -1)], 1
      )
      b = np.concatenate([np.asarray(at['q_bias']).reshape(-1), kvb[0].reshape(-1), kvb[1].reshape(-1)])
      yield from (
        (p + 'ln_1.weight', a(blk['ln1']['scale'])),
        (p + 'ln_1.bias', a(blk['ln1']['bias'])),
        (p + 'attn.c_attn.weight', a(w)),
        (p + 'attn.c_attn.bias', a(b)),
        (p + 'attn.c_proj.weight', a(np.asarray(at['o_kernel']).reshape(H * K, D))),
        (p + 'attn.c_proj.bias', a(at['o_bias'])),
        (p + 'ln_2.weight', a(blk['ln2']['scale'])),
        (p + 'ln_2.bias', a(blk['ln2']['bias'])),
        (p + 'mlp.c_fc.weight', a(mlp['up_kernel'])),
        (p + 'mlp.c_fc.bias', a(mlp['up_bias'])),
        (p + 'mlp.c_proj.weight', a(mlp['down_kernel'])),
        (p + 'mlp.c_proj.bias', a(mlp['down_bias'])),
      )
    yield 'transformer.ln_f.weight', a(params['ln_f']['scale'])
    yield 'transformer.ln_f.bias', a(params['ln_f']['bias'])
  else:
    yield 'model.embed_tokens.weight', a(params['embed'])
    for i in range(cfg.n_layers):
      p, blk = f'model.layers.{i}.', params[f'block_{i}']
      at, mlp = blk['attn'], blk['mlp']
      kv = np.asarray(at['kv_kernel'])
      yield from (
        (p + 'input_layernorm.weight', a(blk['ln1']['scale'])),
        (p + 'self_attn.q_proj.weight', a(np.asarray(at['q_kernel']).reshape(D, H * K).T)),
        (p + 'self_attn.k_proj.weight', a(kv[:, 0].reshape(D, N * K).T)),
        (p + 'self_attn.v_proj.weight', a(kv[:, 1].reshape(D, N * K).T)),
        (p + 'self_attn.o_proj.weight', a(np.asarray(at['o_kernel']).reshape(H * K, D).T)),
        (p + 'post_attention_layernorm.weight', a(blk['ln2']['scale'])),
        (p + 'mlp.gate_proj.weight', a(np.asarray(mlp['gate_kernel']).T)),
        (p + 'mlp.up_proj.weight', a(np.asarray(mlp['up_kernel']).T)),
        (p + 'mlp.down_proj.weight', a(np.asarray(mlp['down_kernel']).T)),
      )
    yield 'model.norm.weight', a(params['ln_f']['scale'])
  if not cfg.tied_embeddings:
    yield 'lm_head.weight', a(np.asarray(params['lm_head']).T)


# ---------------------------------------------------------------------------------------------- whole models


def read(directory: str):
  """(model fields, architecture, tokenizer, numpy params) of a saved HF model directory; everything is checked
  before the weights are read."""
  from lmjax import tokenizers  # pylint: disable=import-outside-toplevel

  hf = read_hf_config(directory)
  arch = architecture(hf)
  fields = model_fields(hf)
  cfg = ModelConfig(**fields)
  tokenizer = tokenizers.HFTokenizer.from_path(directory)  # a missing tokenizer.json is an error saying how to save it
  if tokenizer.vocab_size > cfg.vocab_size:
    raise InteropError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
    )
  tensors = Tensors(directory)
  _check_tensors(tensors, cfg, arch, directory)
  return fields, arch, tokenizer, to_params(tensors, cfg, arch)


def import_config(fields: dict, source: str):
  """The lmjax config of an imported model: today's defaults with the model's fields and the 'hf' tokenizer."""
  config = config_lib.default_config()
  config.model.update(fields)
  config.data.tokenizer = 'hf'
  config.data.hf_tokenizer = os.path.abspath(source)
  config.train.steps = 1  # nothing was trained here; a fine-tune sets its own schedule (train.init_from)
  config.train.eval_batch_size = 8  # rows of the full context: 64 of GPT-2's 1024 tokens would be GBs of logits
  return config


def resolve_source(source: str) -> str:
  """A directory as given, or a hub name downloaded into the HF cache (needs network; never in tests)."""
  if os.path.exists(source) or source.startswith(('.', '/', '~')) or source.count('/') > 1:
    return source  # a path (read_hf_config says if it is not a model directory)
  if os.environ.get('HF_HUB_OFFLINE') == '1':
    raise InteropError(f'{source} is not a directory, and HF_HUB_OFFLINE=1 forbids downloading it from the hub')
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InteropError(
      f'{source} is not a directory; to fetch a hub model, pip install huggingface_hub (or download it yourself)'
    ) from None
  return snapshot_download(source, allow_patterns=['*.json', '*.safetensors', '*.txt', '*.model'])


def import_hf(source: str, workdir: str) -> dict:
  """Writes the HF model in `source` (a directory, or a hub name with network access) as an lmjax workdir:
  config.json, the tokenizer, provenance and a parameters-only checkpoint at step 0. Returns a summary."""
  from lmjax import checkpoint, model as model_lib, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from lmjax.steps import TrainState  # pylint: disable=import-outside-toplevel

  source = resolve_source(source)
  ckpt_dir = workdir_lib.checkpoint_dir(workdir)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise InteropError(f'{workdir} already holds checkpoints; import into a new --workdir')
  fields, arch, tokenizer, params = read(source)  # every refusal comes before the workdir is created
  workdir_lib.ensure_writable(workdir)
  config = import_config(fields, source)
  config_lib.validate(config)
  meta = {
    'config': config.to_dict(),
    'tokenizer': tokenizer.spec(),
    'params_only': True,
    'imported_from': {'source': os.path.abspath(source), 'architecture': arch},
  }
  _to_device(params)
  state = TrainState(step=np.zeros((), np.int32), params=params, opt_state=None)
  with checkpoint.Checkpointer(ckpt_dir, async_save=False, data_iterator=False) as ckpt:
    ckpt.save(0, state, meta=meta, force=True)
    ckpt.wait()
  workdir_lib.record(config, tokenizer, workdir, primary=True)
  n = model_lib.count_params(params)
  return {'workdir': workdir, 'architecture': arch, 'parameters': int(n), 'tokenizer_vocab': tokenizer.vocab_size}


def _to_device(tree: dict) -> None:
  """Moves each leaf to the default device in place, one at a time: its host copy is freed as soon as it is moved,
  and Orbax saves device arrays without another host copy of the whole model."""
  import jax  # pylint: disable=import-outside-toplevel

  for k, v in tree.items():
    if isinstance(v, dict):
      _to_device(v)
    else:
      tree[k] = jax.device_put(v)


def write_tokenizer(tokenizer, out: str) -> bool:
  """tokenizer.json and tokenizer_config.json that AutoTokenizer loads, for an 'hf' tokenizer; False otherwise."""
  from lmjax import tokenizers  # pylint: disable=import-outside-toplevel

  if not isinstance(tokenizer, tokenizers.HFTokenizer):
    return False
  with open(os.path.join(out, 'tokenizer.json'), 'wb') as f:
    f.write(tokenizer.raw)
  token = lambda i: tokenizer._tok.id_to_token(i) if i is not None else None  # pylint: disable=protected-access
  settings = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'bos_token': token(tokenizer.bos_id),
    'eos_token': token(tokenizer.eos_id),
    'pad_token': token(tokenizer.pad_id),
    'add_bos_token': tokenizer.adds_bos,
    'clean_up_tokenization_spaces': False,
  }
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=2)
  return True


def export_hf(workdir: str, out: str, step=None) -> dict:
  """Writes a workdir's checkpoint (`step`: a number, 'best' or None for the latest) as a directory that
  transformers' from_pretrained loads: config.json, model.safetensors, and the tokenizer when it is an 'hf' one."""
  import jax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  from lmjax import inference, model as model_lib, workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = workdir_lib.load_config(workdir)
  cfg = config_lib.ModelConfig(**config.model.to_dict())
  tokenizer = workdir_lib.load_tokenizer(workdir)
  hf = hf_config(cfg, tokenizer)  # refuses before any array is read
  if os.path.exists(out) and os.listdir(out):
    raise InteropError(f'{out} is not empty; export into a new directory')
  config, tokenizer, task, state = inference.load_run(workdir, step=step)
  params = jax.device_get(state.params)  # whole arrays on the host, from whatever mesh they were restored onto
  if cfg.scan_layers:
    params = model_lib.unstack_layers(params)
  os.makedirs(out, exist_ok=True)
  tensors = dict(from_params(params, cfg, hf['architectures'][0]))
  save_file(tensors, os.path.join(out, SAFETENSORS), metadata={'format': 'pt'})
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  has_tokenizer = write_tokenizer(tokenizer, out)
  if not has_tokenizer:
    print(
      f'lmjax export-hf: the run uses the {tokenizer.spec()["kind"]!r} tokenizer, which has no Hugging Face '
      'tokenizer file; the model loads with from_pretrained, the tokenizer stays with lmjax',
      file=sys.stderr,
    )
  return {
    'out': out,
    'architecture': hf['architectures'][0],
    'step': int(state.step),
    'parameters': int(sum(x.size for x in tensors.values())),
    'tokenizer': has_tokenizer,
  }
