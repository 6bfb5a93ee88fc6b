"""Decoder-only Transformer in Flax Linen.

Defaults reproduce the GPT-2 block: pre-LayerNorm, learned positions, a GELU MLP (exact erf as nanoGPT, or
GPT-2's own tanh approximation), tied embeddings, biases. Options cover the Llama family too: RMSNorm, RoPE (with
Llama 3.1's frequency scaling), SwiGLU, grouped-query attention, no biases. lmjax/hf/ maps both families'
Hugging Face checkpoints onto these parameters. Stability options, off by default: QK-norm, and soft-caps of the
attention scores and the final logits (Gemma 2). And what Qwen, Mistral and Gemma add (lmjax/config.py says each):
head_dim, qkv_bias, norm_offset, embed_scale, post_norms, geglu, query_pre_attn_scalar, and sliding-window layers
(attn_window, global_every, rope_local_theta).

Shapes live in names, one letter per dim: B batch, L query length, T key/value length (the cache length when
decoding), D d_model, H query heads, N key/value heads (H = N * G, G heads share one kv head), K head dim,
F feed-forward dim, V vocab.

One forward pass serves training, evaluation, prefill and decoding. Attention masks are built from *slots*
(indices along the sequence or the KV cache) and *segment ids*: a key is visible to a query when its slot is not
later and its segment is the same. Packed documents get distinct segment ids, and left padding gets segment 0,
so one rule covers causality, packing and batched prompts of different lengths.

Parameters carry logical axis names (`nn.with_logical_partitioning`); lmjax/parallel.py maps them onto the mesh.
Parameter paths are stable: `embed`, `pos_embed`, `block_{i}/{ln1,attn/{q,kv,o},ln2,mlp/{up,gate,down}}`,
`ln_f`, `lm_head` (with model.qk_norm, `attn/{q_norm,k_norm}/scale` too; with post_norms, `ln1_post`,
`ln2_post`); with scanned layers, `blocks/...` holds the same leaves with a leading layer axis
(`stack_layers` / `unstack_layers` convert between the two; a checkpoint refuses to resume across them).

Precision: `dtype` is the compute dtype, `param_dtype` the master weights'. On GPU/TPU use dtype='bfloat16' with
param_dtype='float32' (bf16 matmuls, f32 weights and optimizer state); CPU configs stay float32, where bf16 is
slower. Norm statistics, attention softmax, logits and the loss are float32 whatever `dtype` is.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import attention, config as config_lib
from lmjax.config import ModelConfig  # the schema lives with the config: one declaration of each field

Array = jax.Array


# What the backward pass keeps of each block (the rest is recomputed). 'none' keeps everything (no remat);
# 'full' keeps only the block's input; 'save_dots' keeps every matmul output; 'save_proj' keeps the projection
# matmuls but recomputes attention scores (they grow with length squared).
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'save_dots': jax.checkpoint_policies.checkpoint_dots,
  'save_proj': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == config_lib.REMAT

_INIT_STD = 0.02  # GPT-2's init; residual projections are scaled by 1/sqrt(2 * n_layers) on top.


def _dense_init(axes, std=_INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _lead(v, ndim):
  """v with leading unit dims up to rank ndim: broadcasting made explicit (tests run with rank promotion off)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


class Norm(nn.Module):
  """The configured norm (model.norm) over the last axis; `rms`: RMSNorm with a scale and no bias whatever model.norm
  says (model.qk_norm's per-head norm of q and k, as Qwen3 and Gemma 3)."""

  cfg: ModelConfig
  rms: bool = False

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    layernorm = cfg.norm == 'layernorm' and not self.rms
    # norm_offset (Gemma): the scale is 1 + w with w stored and initialised to 0
    init = nn.initializers.zeros_init() if cfg.norm_offset else nn.initializers.ones_init()
    # statistics in float32 whatever the compute dtype
    y = standardize(x_BxLxD.astype(jnp.float32), cfg.norm_eps, layernorm)
    scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)), (y.shape[-1],), cfg.param_dtype)
    y = y * _lead(1 + scale.astype(jnp.float32) if cfg.norm_offset else scale, y.ndim)
    if cfg.use_bias and layernorm:
      y = y + _lead(self.param('bias', _zeros(('norm',)), (y.shape[-1],), cfg.param_dtype), y.ndim)
    return y.astype(cfg.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def standardize(x, eps: float, center: bool):
  """(x - mean) / sqrt(var + eps) over the last axis (LayerNorm before its scale and bias), or with center=False
  x / sqrt(mean(x^2) + eps) (RMSNorm's). Hand-written backward, exact for both: rstd * (g - mean(g) - y * mean(g y))
  (no mean(g) term without centering), from the saved output y and rstd. Autodiff's backward of the same forward
  is a longer chain of reductions and elementwise ops: the CPU recipe's train step compiled in 2.2-2.7 s with this
  against 2.9-3.3 s (three fresh processes each, alternating); its step time did not change."""
  return _standardize_fwd(x, eps, center)[0]


def _standardize_fwd(x, eps, center):
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  y = x * rstd
  return y, (y, rstd)


def _standardize_bwd(eps, center, res, g):
  y, rstd = res
  g_centered = g - jnp.mean(g, axis=-1, keepdims=True) if center else g
  return (rstd * (g_centered - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


def rope_frequencies(cfg: ModelConfig, theta=None):
  """The K/2 rotary frequencies (radians per position): theta^(-2i/K) (theta: model.rope_theta unless given, as a
  windowed layer's rope_local_theta), and with rope_scaling='llama3' Llama 3.1's
  rescaling: wavelengths longer than rope_original_max_len / low_freq_factor are stretched by rope_factor, those
  shorter than rope_original_max_len / high_freq_factor kept, and the band between blended linearly in
  rope_original_max_len / wavelength."""
  k = cfg.head_size
  theta = cfg.rope_theta if theta is None else theta
  freq_K2 = theta ** -(jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  if cfg.rope_scaling == 'none':
    return freq_K2
  old_len, factor = cfg.rope_original_max_len, cfg.rope_factor
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen_K2 = 2 * jnp.pi / freq_K2
  smooth_K2 = (old_len / wavelen_K2 - low) / (high - low)
  blended_K2 = (1 - smooth_K2) * freq_K2 / factor + smooth_K2 * freq_K2
  scaled_K2 = jnp.where(wavelen_K2 > old_len / low, freq_K2 / factor, blended_K2)
  return jnp.where(wavelen_K2 < old_len / high, freq_K2, scaled_K2)


def rope(x_BxLxHxK, positions_BxL, freq_K2):
  """Rotary position embedding (half-split layout, as Llama/NeoX): rotates pairs (i, i + K/2) by position * freq."""
  angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * freq_K2[None, None, :]
  sin, cos = jnp.sin(angle_BxLxK2)[:, :, None, :], jnp.cos(angle_BxLxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


@jax.custom_vjp
def gelu(x):
  """Exact-erf GELU, x * Phi(x), as GPT-2/nanoGPT, with a hand-written backward, Phi(x) + x * phi(x): one
  elementwise pass saving only x. (Measured only together with the other backward changes of issue #6.)"""
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
  return x * cdf, x


def _gelu_bwd(x, g):
  # The barrier hides that this x is the forward's x: without it XLA merges the two erf(x) and keeps the forward's
  # erf as a materialised L x 4D buffer until the backward, instead of fusing it into x * cdf (one buffer of the
  # MLP's width per layer less to write and read back).
  x = jax.lax.optimization_barrier(x)
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
  pdf = jnp.exp(-0.5 * x * x) * (2.0 * jnp.pi) ** -0.5
  return (g * (cdf + x * pdf).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _dropout_seed(module: nn.Module):
  """Four uint32 from the module's 'dropout' key (deterministic per seed, step and module path) that seed XLA's
  RngBitGenerator (attention.dropout_keep): it makes mask bits far faster than jax.random's threefry on CPU
  (threefry masks took ~3.4 s of a 14.6 s step on the 6-layer recipe). Same key, same mask: resumed runs stay exact."""
  return jax.random.bits(module.make_rng('dropout'), (4,), jnp.uint32)


def dropout(module: nn.Module, x, rate: float):
  keep = attention.dropout_keep(_dropout_seed(module), x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _select(local, if_local, otherwise):
  """if_local or otherwise by a layer's `local` flag: a Python bool (unscanned layers) or a traced one (scanned)."""
  if isinstance(local, bool):
    return if_local if local else otherwise
  return jnp.where(local, if_local, otherwise)


class Attention(nn.Module):
  """Self-attention of one layer; `local` says whether it is windowed (model.attn_window, ModelConfig.is_local)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, *, train, cache=None, cache_index=None, local=False):
    cfg = self.cfg
    H, N, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
    dense = lambda name, shape, axes, std=_INIT_STD: self.param(name, _dense_init(axes, std), shape, cfg.param_dtype)
    bias = lambda name, shape, axes: self.param(name, _zeros(axes), shape, cfg.param_dtype)
    dt = cfg.dtype

    # q, k and v from one (B*L, D) x (D, (H + 2N) * K) matmul: one 2-D dot forward and backward instead of
    # three batched einsums, whose CPU backward adds transposes. The stored kernels keep their own shapes.
    w_DxC = jnp.concatenate(
      [
        dense('q_kernel', (D, H, K), ('embed', 'heads', 'head_dim')).reshape(D, H * K),
        dense('kv_kernel', (D, 2, N, K), ('embed', None, 'kv_heads', 'head_dim')).reshape(D, 2 * N * K),
      ],
      axis=1,
    ).astype(dt)
    B, L = x_BxLxD.shape[:2]
    qkv_BLxC = jnp.dot(x_BxLxD.reshape(B * L, D), w_DxC)
    if cfg.use_bias or cfg.qkv_bias:
      b_C = jnp.concatenate(
        [
          bias('q_bias', (H, K), ('heads', 'head_dim')).reshape(H * K),
          bias('kv_bias', (2, N, K), (None, 'kv_heads', 'head_dim')).reshape(2 * N * K),
        ]
      )
      qkv_BLxC = qkv_BLxC + b_C.astype(dt)[None, :]
    # split, not three slices: its backward is one concatenate, where slices' is three pads and their sum
    q_BLxHK, k_BLxNK, v_BLxNK = jnp.split(qkv_BLxC, [H * K, (H + N) * K], axis=1)
    q_BxLxHxK = q_BLxHK.reshape(B, L, H, K)
    k_BxLxNxK = k_BLxNK.reshape(B, L, N, K)
    if cfg.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
      q_BxLxHxK = Norm(cfg, rms=True, name='q_norm')(q_BxLxHxK)
      k_BxLxNxK = Norm(cfg, rms=True, name='k_norm')(k_BxLxNxK)
    k_BxNxLxK = k_BxLxNxK.transpose(0, 2, 1, 3)
    v_BxNxLxK = v_BLxNK.reshape(B, L, N, K).transpose(0, 2, 1, 3)
    if cfg.positions == 'rope':
      theta = _select(local, cfg.rope_local_theta, cfg.rope_theta) if cfg.rope_local_theta else None
      freq_K2 = rope_frequencies(cfg, theta)
      q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, freq_K2)
      k_BxNxLxK = rope(k_BxNxLxK.transpose(0, 2, 1, 3), positions_BxL, freq_K2).transpose(0, 2, 1, 3)

    new_cache = None
    if cache is not None:  # decoding: write this chunk at cache_index, attend over the whole cache
      upd = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, cache_index, 0))
      new_cache = {'k': upd(cache['k'], k_BxNxLxK), 'v': upd(cache['v'], v_BxNxLxK)}
      k_BxNxLxK, v_BxNxLxK = new_cache['k'].astype(dt), new_cache['v'].astype(dt)

    drop_rng = self.make_rng('dropout') if (train and cfg.dropout > 0) else None
    causal = cache is None  # a sequence attending to itself: kernels may skip the blocks above the diagonal
    chunk = attention.chunk_for(L, cfg.attention_chunk) if causal else 0
    # With a cache the mask already holds the window (Transformer); a global layer's window is the whole row.
    window = _select(local, cfg.attn_window, L) if causal and cfg.attn_window else 0
    out_BxLxHxK = attention.attend(
      q_BxLxHxK,
      k_BxNxLxK,
      v_BxNxLxK,
      mask,
      impl=cfg.attention,
      dropout=cfg.dropout if train else 0.0,
      dropout_rng=drop_rng,
      causal=causal,
      causal_chunk=chunk,
      softcap=cfg.attn_softcap,
      scale=cfg.attention_scale,
      window=window,
    )
    std_out = _INIT_STD / (2 * cfg.n_layers) ** 0.5
    o_HKxD = dense('o_kernel', (H, K, D), ('heads', 'head_dim', 'embed'), std_out).reshape(H * K, D).astype(dt)
    y_BLxD = jnp.dot(out_BxLxHxK.reshape(B * L, H * K), o_HKxD)  # 2-D, as in Mlp: no transposes in its backward
    if cfg.use_bias:
      y_BLxD += _lead(bias('o_bias', (D,), ('embed',)).astype(dt), 2)
    return y_BLxD.reshape(B, L, D), new_cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    D, F, dt = cfg.d_model, cfg.ff_dim, cfg.dtype
    std_out = _INIT_STD / (2 * cfg.n_layers) ** 0.5

    def dense(name, x, shape, axes, std=_INIT_STD):
      y = jnp.dot(x, self.param(f'{name}_kernel', _dense_init(axes, std), shape, cfg.param_dtype).astype(dt))
      if cfg.use_bias:
        y += _lead(self.param(f'{name}_bias', _zeros(axes[-1:]), shape[-1:], cfg.param_dtype).astype(dt), y.ndim)
      return y

    # Matmuls on (B*L, .) rows: the weight gradients become plain 2-D dots; with 3-D operands XLA's CPU backward
    # first transposes every activation gradient to put B and L last.
    B, L = x_BxLxD.shape[:2]
    x_BLxD = x_BxLxD.reshape(B * L, D)
    h_BLxF = dense('up', x_BLxD, (D, F), ('embed', 'mlp'))
    if cfg.mlp == 'swiglu':
      h_BLxF = nn.silu(dense('gate', x_BLxD, (D, F), ('embed', 'mlp'))) * h_BLxF
    elif cfg.mlp == 'geglu':
      h_BLxF = jax.nn.gelu(dense('gate', x_BLxD, (D, F), ('embed', 'mlp')), approximate=True) * h_BLxF
    elif cfg.mlp == 'gelu_tanh':
      h_BLxF = jax.nn.gelu(h_BLxF, approximate=True)
    else:
      h_BLxF = gelu(h_BLxF)
    h_BxLxF = nn.with_logical_constraint(h_BLxF.reshape(B, L, F), ('batch', 'length', 'mlp'))
    return dense('down', h_BxLxF.reshape(B * L, F), (F, D), ('mlp', 'embed'), std_out).reshape(B, L, D)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, train: bool, cache=None, cache_index=None, local=False):
    cfg = self.cfg
    drop = lambda y: dropout(self, y, cfg.dropout) if (train and cfg.dropout > 0) else y
    # model.post_norms (Gemma 2/3): each branch's output is normed once more before it joins the residual
    post = lambda name, y: Norm(cfg, name=name)(y) if cfg.post_norms else y
    y, new_cache = Attention(cfg, name='attn')(
      Norm(cfg, name='ln1')(x_BxLxD),
      positions_BxL,
      mask,
      train=train,
      cache=cache,
      cache_index=cache_index,
      local=local,
    )
    x_BxLxD = x_BxLxD + drop(post('ln1_post', y))
    x_BxLxD = x_BxLxD + drop(post('ln2_post', Mlp(cfg, name='mlp')(Norm(cfg, name='ln2')(x_BxLxD))))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed_act'))
    return x_BxLxD, new_cache


class _ScanBlock(nn.Module):
  """Block with the (carry, xs) -> (carry, ys) signature nn.scan wants; the cache is the per-layer xs/ys."""

  cfg: ModelConfig
  train: bool

  @nn.compact
  def __call__(self, x_BxLxD, xs, positions_BxL, masks, cache_index):
    cache, local = xs
    mask, local_mask = masks  # with a cache, the windowed layers' mask beside the global one
    if local_mask is not None:
      mask = jnp.where(local, local_mask, mask)
    return Block(self.cfg, name='block')(x_BxLxD, positions_BxL, mask, self.train, cache, cache_index, local)


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxL,
    positions_BxL=None,
    segment_ids_BxL=None,
    *,
    train: bool = False,
    cache=None,
    cache_index=None,
    kv_segment_ids_BxT=None,
    logits_at_BxS=None,
  ):
    """Returns float32 logits_BxLxV, or (logits_BxLxV, new_cache) when `cache` is given.

    positions: token positions (default 0..L-1); they restart at 0 in every packed document.
    segment_ids: document ids in a packed row, 0 for padding (default: all one segment).
    cache / cache_index / kv_segment_ids: decoding. `cache` is what `init_cache` returns; this chunk is written at
      slots cache_index .. cache_index + L - 1; kv_segment_ids_BxT gives the segment of every cache slot.
    logits_at_BxS: logits only at these indices along L (then logits_BxSxV): scoring a continuation after a
      prefilled context needs the last context position's alone, and the output head is the widest matmul.
    """
    cfg = self.cfg
    B, L = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if cache is not None:
      q_slot_L = jnp.arange(L, dtype=jnp.int32) + cache_index
      kv_slot_T = jnp.arange(cache['k'][0].shape[-2] if not cfg.scan_layers else cache['k'].shape[-2], dtype=jnp.int32)
    # Without a cache, attention gets the segment ids (None: one sequence per row) and builds the causal mask itself,
    # or a fused kernel skips the hidden blocks; nothing L x T crosses the layers. With a cache, the slots' mask.
    mask = (
      segment_ids_BxL
      if cache is None
      else attention.make_mask(q_slot_L, kv_slot_T, segment_ids_BxL, kv_segment_ids_BxT)
    )
    # Windowed layers over a cache: the same mask, keys more than attn_window - 1 slots back hidden too. The cache
    # keeps every slot; the window only masks (slots, unlike positions, never restart, and within one document or
    # one left-padded row they differ exactly as positions do).
    local_mask = None
    if cache is not None and cfg.attn_window:
      local_mask = attention.make_mask(q_slot_L, kv_slot_T, segment_ids_BxL, kv_segment_ids_BxT, cfg.attn_window)

    embed = self.param('embed', _dense_init(('vocab', 'embed')), (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    x_BxLxD = jnp.take(embed, tokens_BxL, axis=0).astype(cfg.dtype)
    if cfg.embed_scale:  # Gemma: the factor rounded to the compute dtype first, as transformers does
      x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model**0.5, cfg.dtype)
    if cfg.positions == 'learned':
      pos_embed = self.param('pos_embed', _dense_init((None, 'embed')), (cfg.max_len, cfg.d_model), cfg.param_dtype)
      x_BxLxD = x_BxLxD + jnp.take(pos_embed, positions_BxL, axis=0).astype(cfg.dtype)
    if train and cfg.dropout > 0:
      x_BxLxD = dropout(self, x_BxLxD, cfg.dropout)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'embed_act'))

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.scan_layers:
      block = _ScanBlock
      if cfg.remat != 'none':
        block = nn.remat(block, policy=policy, prevent_cse=False)
      stack = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      local_L = jnp.array([cfg.is_local(i) for i in range(cfg.n_layers)])
      x_BxLxD, new_cache = stack(cfg, train, name='blocks')(
        x_BxLxD, (cache, local_L), positions_BxL, (mask, local_mask), cache_index
      )
    else:
      block = Block
      if cfg.remat != 'none':
        block = nn.remat(Block, policy=policy, static_argnums=(4, 7))
      new_cache = None if cache is None else {'k': [], 'v': []}
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else {'k': cache['k'][i], 'v': cache['v'][i]}
        local = cfg.is_local(i)
        layer_mask = local_mask if local and local_mask is not None else mask
        x_BxLxD, c = block(cfg, name=f'block_{i}')(
          x_BxLxD, positions_BxL, layer_mask, train, layer_cache, cache_index, local
        )
        if cache is not None:
          new_cache['k'].append(c['k'])
          new_cache['v'].append(c['v'])

    x_BxLxD = Norm(cfg, name='ln_f')(x_BxLxD)
    if logits_at_BxS is not None:
      x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_BxS[:, :, None], axis=1)
      L = logits_at_BxS.shape[1]
    x_BLxD = x_BxLxD.reshape(B * L, cfg.d_model)  # 2-D: the head's weight gradient needs no transposes
    if cfg.tied_embeddings:
      logits_BLxV = jnp.dot(x_BLxD, embed.astype(cfg.dtype).T, preferred_element_type=jnp.float32)
    else:
      head = self.param('lm_head', _dense_init(('embed', 'vocab')), (cfg.d_model, cfg.vocab_size), cfg.param_dtype)
      logits_BLxV = jnp.dot(x_BLxD, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
    logits_BxLxV = attention.softcap(logits_BLxV.astype(jnp.float32).reshape(B, L, cfg.vocab_size), cfg.final_softcap)
    return logits_BxLxV if cache is None else (logits_BxLxV, new_cache)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None):
  """Zeroed KV cache, (batch, kv_heads, time, head_dim) per layer: decoding writes one time slot per step without
  transposing the cache. Unscanned models keep a list of per-layer arrays so an update touches one layer only."""
  shape = (batch, cfg.kv_heads, length, cfg.head_size)
  dtype = dtype or cfg.dtype
  if cfg.scan_layers:
    z = jnp.zeros((cfg.n_layers, *shape), dtype)
    return {'k': z, 'v': z}
  return {
    'k': [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
    'v': [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
  }


def stack_layers(params, n_layers: int):
  """Unscanned params (`block_0` .. `block_{n-1}`) -> the scanned layout (`blocks/block`, leading layer axis).
  Same weights, same outputs: use it to load an unscanned checkpoint into a scan_layers=True model."""
  missing = [f'block_{i}' for i in range(n_layers) if f'block_{i}' not in params]
  if missing or 'blocks' in params:
    raise ValueError(
      f'stack_layers wants unscanned params with block_0..block_{n_layers - 1}; '
      f'missing {missing or "none"}, has blocks: {"blocks" in params}'
    )
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  out['blocks'] = {'block': jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'block_{i}'] for i in range(n_layers)])}
  return out


def unstack_layers(params):
  """Scanned params (`blocks/block`, leading layer axis) -> the unscanned layout (`block_{i}`); inverse of
  stack_layers."""
  if 'blocks' not in params:
    raise ValueError('unstack_layers wants scanned params (a `blocks` entry); these are already unscanned')
  out = {k: v for k, v in params.items() if k != 'blocks'}
  stacked = params['blocks']['block']
  for i in range(jax.tree.leaves(stacked)[0].shape[0]):
    out[f'block_{i}'] = jax.tree.map(lambda x: x[i], stacked)
  return out


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: Optional[int] = None) -> float:
  """Training FLOPs per token: 6 * N (matmul params, forward + backward) + 12 * n_layers * H * K * seq_len
  (attention scores and weighted sum, causal mask not discounted) -- the PaLM appendix B formula, as nanoGPT's
  estimate_mfu. N excludes the position table (a lookup, not a matmul) and counts the tied embedding once, as
  the output projection. This is the one place lmjax computes model FLOPs: MFU, `lmjax plan` and benchmarks call it.
  """
  D, F, H, N, K = cfg.d_model, cfg.ff_dim, cfg.n_heads, cfg.kv_heads, cfg.head_size
  per_layer = D * H * K + D * 2 * N * K + H * K * D + (3 if cfg.mlp in config_lib.GATED_MLPS else 2) * D * F
  matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * D
  return 6.0 * matmul_params + 12.0 * cfg.n_layers * H * K * seq_len  # H * K = D unless model.head_dim says
