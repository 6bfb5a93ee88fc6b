"""Sampling: prompt prefill and token-by-token decoding in one compiled function, and `lmjax sample`.

A call left-pads the prompts to one length P (pad slots get segment id 0, so no real token ever sees them; positions
count from each row's first real token), runs them through the model in one forward pass that fills the KV cache,
then decodes inside a `lax.while_loop` that stops as soon as every row has finished. Every row writes the same cache
slot at each step, so the whole batch moves in lock-step.

Decoding reads the cache at every step, so its cost grows with the cache length. The loop therefore runs in stages
whose caches grow by a factor of 4 (S = 64, 256, ... up to P + max_new_tokens): a step only reads the slots it can
see, and a stage's cache is zero-padded to the next size when the stage ends. Each stage is one while_loop of the
same body; the model is traced once per stage (a handful), not once per step.

Sliding window: when prompt + max_new_tokens exceeds the model's context max_len (a 64-token char model asked for
500 characters), generation runs in chunks of C tokens (C = max_len // 4 unless `window_chunk` says otherwise).
Every chunk re-prefills from the last max_len - C tokens of each row (prompt + what it generated so far) and decodes
C tokens, so every new token conditions on at least max_len - C previous ones and positions stay below max_len.
Smaller C gives each token more context but costs more prefills (one per chunk); C = 1 is nanoGPT's crop-the-context
decoding (a full window forward pass per token). Every chunk is one call of the same compiled program (prompt length
max_len - C, C new tokens); chunk k samples with the seed's key folded with k, so a seed gives one result. The
schedule does not depend on the other prompts in the batch (chunk 0 also starts from the last max_len - C tokens of
the prompt), so a batched prompt gets the same tokens as alone. Beam search does not slide: it needs the whole
sequence in one cache.

Decoding methods: greedy (temperature 0), temperature, top-k, top-p (nucleus), min-p -- the last four compose, in
the order of Hugging Face's warpers: temperature, then top-k, then top-p and min-p on the renormalised top-k -- and
beam search (lmjax/beam.py) with the ((5 + length) / 6) ** alpha length penalty of Google's/Flax's beam search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model as model_lib
from lmjax import beam, compiling, hostenv, metrics, parallel, tokenizers
from lmjax.errors import SampleError

_NEG = beam.NEG
_MIN_STAGE = 64  # smallest staged cache: below this, a stage's loop overhead costs more than the reads it saves
_STAGE_GROWTH = 4  # each stage's cache is this many times the last: fewer stages = fewer model copies to compile
MEMORY_FRACTION = 0.5  # refuse a call whose KV cache alone would take more than this share of free memory


# ------------------------------------------------------------------------------------------ token choice


def _candidates(logits_BxV, top_k: int, need_sorted: bool):
  """(values_BxC, ids_BxC): the top_k largest logits (sorted), or all V (sorted only when `need_sorted`).
  lax.top_k keeps the common top-k case a partial selection instead of a full-vocabulary sort."""
  V = logits_BxV.shape[-1]
  if 0 < top_k < V or need_sorted:
    return jax.lax.top_k(logits_BxV, top_k if 0 < top_k < V else V)
  return logits_BxV, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), logits_BxV.shape)


def _keep(scaled_BxC, top_p, min_p, use_top_p: bool, use_min_p: bool):
  """Which candidates survive top-p and min-p, both on the distribution renormalised over the candidates.
  top-p keeps the smallest prefix (candidates sorted descending) whose mass reaches top_p: a candidate stays when
  the mass strictly before it is still below top_p, so the most likely token always stays."""
  p_BxC = jax.nn.softmax(scaled_BxC, axis=-1)
  keep_BxC = jnp.ones(p_BxC.shape, bool)
  if use_top_p:
    keep_BxC &= (jnp.cumsum(p_BxC, axis=-1) - p_BxC) < top_p
  if use_min_p:
    keep_BxC &= p_BxC >= min_p * jnp.max(p_BxC, axis=-1, keepdims=True)
  return keep_BxC


def filter_logits(logits_BxV, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
  """logits_BxV / temperature with every token outside the kept set at -1e30: the distribution the sampler draws
  from, over the whole vocabulary (for inspection and tests; the sampler works on the candidates directly)."""
  vals_BxC, ids_BxC = _candidates(logits_BxV, top_k, top_p < 1.0)
  scaled_BxC = vals_BxC / temperature
  keep_BxC = _keep(scaled_BxC, top_p, min_p, top_p < 1.0, min_p > 0.0)
  out_BxV = jnp.full(logits_BxV.shape, _NEG, jnp.float32)
  rows_B1 = jnp.arange(logits_BxV.shape[0])[:, None]
  return out_BxV.at[rows_B1, ids_BxC].set(jnp.where(keep_BxC, scaled_BxC, _NEG))


class _Static(NamedTuple):
  """Everything that changes the compiled program (shapes aside); the rest is passed as traced scalars."""

  greedy: bool
  top_k: int
  use_top_p: bool
  use_min_p: bool
  eos_id: Optional[int]
  beam_size: int  # 0 = sample (or greedy); >= 1 = beam search of this width
  staged: bool


def _choose(logits_BxV, key, temperature, top_p, min_p, st: _Static):
  if st.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  vals_BxC, ids_BxC = _candidates(logits_BxV, st.top_k, st.use_top_p)
  scaled_BxC = vals_BxC / temperature
  if st.use_top_p or st.use_min_p:
    scaled_BxC = jnp.where(_keep(scaled_BxC, top_p, min_p, st.use_top_p, st.use_min_p), scaled_BxC, _NEG)
  pick_B = jax.random.categorical(key, scaled_BxC, axis=-1)
  return jnp.take_along_axis(ids_BxC, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ------------------------------------------------------------------------------------------ the compiled program


def _stage_sizes(P: int, cache_len: int, staged: bool):
  if not staged:
    return [cache_len]
  sizes, s = [], max(_MIN_STAGE, 1 << P.bit_length())  # the first stage holds the prompt and >= 1 new slot
  while s < cache_len:
    sizes.append(s)
    s *= _STAGE_GROWTH
  if sizes and cache_len < 1.25 * sizes[-1]:  # a last stage of a few steps costs a compile for nothing
    sizes.pop()
  return sizes + [cache_len]


def _pad_time(tree, size):
  """Zero-pads every cache array along time (axis -2 in both the per-layer and the stacked layout)."""
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - x.shape[-2]), (0, 0)])
  return jax.tree.map(pad, tree)


def _program(
  params, tokens_RxP, segs_RxP, lens_R, done_R, key, temperature, top_p, min_p, alpha, *, cfg, max_new, st: _Static
):
  """Prefill + decode. Returns tokens_RxN (N = max_new; rows that hit EOS are padded with it after it) and
  scores_R (beam search: the length-penalised log-probability; sampling: zeros). Rows already `done_R` (they
  emitted EOS in an earlier sliding-window chunk) emit only padding; beam search ignores done_R."""
  R, P = tokens_RxP.shape
  model = model_lib.Transformer(cfg)
  pad_id = st.eos_id if st.eos_id is not None else 0
  sizes = _stage_sizes(P, P + max_new - 1, st.staged)
  # Segment ids of every cache slot, per stage size: the prompt's (0 = padding), then 1 for every new token. Built
  # once here so the loop body does not rebuild them at every step.
  kv_segs = {S: jnp.concatenate([segs_RxP, jnp.ones((R, S - P), jnp.int32)], axis=1) for S in set(sizes)}

  def forward(tok_RxL, pos_RxL, seg_RxL, cache, index):
    S = cache['k'][0].shape[-2] if not cfg.scan_layers else cache['k'].shape[-2]
    logits_RxLxV, cache = model.apply(
      {'params': params}, tok_RxL, pos_RxL, seg_RxL, cache=cache, cache_index=index, kv_segment_ids_BxT=kv_segs[S]
    )
    return logits_RxLxV[:, -1], cache

  def decode_step(t, last_R, cache):
    """Feeds the token generated at step t-1 (slot P + t - 1) and returns the logits for step t."""
    one = jnp.ones((R, 1), jnp.int32)
    return forward(last_R[:, None], (lens_R + t - 1)[:, None], one, cache, P + t - 1)

  positions_RxP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None] - (P - lens_R)[:, None], 0)
  cache = model_lib.init_cache(cfg, R, sizes[0])
  logits_RxV, cache = forward(tokens_RxP, positions_RxP, segs_RxP, cache, 0)

  def run_stages(carry, cont, body):
    """carry[-1] is the cache; each stage decodes while t + 1 <= S - P + 1, i.e. its slot P + t - 1 fits in S."""
    for i, S in enumerate(sizes):
      if i:
        carry = (*carry[:-1], _pad_time(carry[-1], S))
      carry = jax.lax.while_loop(lambda c, S=S: cont(c) & (c[0] <= S - P), body, carry)
    return carry

  if not st.beam_size:

    def pick(logits_RxV, t):
      return _choose(logits_RxV, jax.random.fold_in(key, t), temperature, top_p, min_p, st)

    tok_R = jnp.where(done_R, pad_id, pick(logits_RxV, 0))
    out_RxN = jnp.full((R, max_new), pad_id, jnp.int32).at[:, 0].set(tok_R)
    done_R = done_R | (tok_R == pad_id) if st.eos_id is not None else done_R

    def body(c):
      t, last_R, done_R, out_RxN, cache = c
      logits_RxV, cache = decode_step(t, last_R, cache)
      tok_R = jnp.where(done_R, pad_id, pick(logits_RxV, t))
      out_RxN = jax.lax.dynamic_update_slice(out_RxN, tok_R[:, None], (0, t))
      if st.eos_id is not None:
        done_R = done_R | (tok_R == st.eos_id)
      return t + 1, tok_R, done_R, out_RxN, cache

    cont = lambda c: (c[0] < max_new) & ~jnp.all(c[2])
    _, _, _, out_RxN, _ = run_stages((jnp.int32(1), tok_R, done_R, out_RxN, cache), cont, body)
    return out_RxN, jnp.zeros((R,), jnp.float32)

  return beam.search(
    logits_RxV,
    cache,
    decode_step,
    run_stages,
    beam_size=st.beam_size,
    eos_id=st.eos_id,
    pad_id=pad_id,
    max_new=max_new,
    alpha=alpha,
    batch_axis=1 if cfg.scan_layers else 0,
  )


@functools.lru_cache(maxsize=32)
def _compiled(cfg: model_lib.ModelConfig, max_new: int, st: _Static, param_shardings, mesh):
  """One jitted program per model, length and decoding options; jax.jit then caches per input shape, so a repeated
  call with the same batch and prompt bucket never recompiles."""
  fn = functools.partial(_program, cfg=cfg, max_new=max_new, st=st)
  options = compiling.decode_compiler_options()
  if mesh is None:
    return jax.jit(fn, compiler_options=options)
  repl = parallel.replicated(mesh)
  param_shardings = jax.tree.unflatten(*param_shardings)
  return jax.jit(
    fn, in_shardings=(param_shardings,) + (repl,) * 9, out_shardings=(repl, repl), compiler_options=options
  )


def _program_shape(model_cfg, longest, max_new_tokens, n_prompts, n_per, beams, mesh, window_chunk, slide):
  """(P, chunk, R): padded prompt length, tokens decoded per call, rows of the compiled program. n_per rows per
  prompt; `beams`: they are one beam search's beams, kept together on one shard."""
  chunk = window_chunk_len(model_cfg, window_chunk) if slide else max_new_tokens
  # Sliding: every chunk's prompt is the last max_len - chunk tokens (one compiled shape for all chunks). Otherwise,
  # round the padded prompt length up to a multiple of 16 (when the context allows) so nearby prompt lengths share
  # one compiled program; extra left padding is invisible to the model.
  L = model_cfg.max_len
  P = L - chunk if slide else min(-(-longest // 16) * 16, L - max_new_tokens)
  rows = n_prompts * n_per
  extra = 0
  if mesh is not None:  # the batch is split over (data, fsdp): pad rows to a multiple of that with dummy copies
    shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    extra = -rows % (shards * n_per) if beams else -rows % shards
  return P, chunk, rows + extra


def _static(temperature, top_k, top_p, min_p, eos_id, beam_size, staged=True) -> _Static:
  return _Static(
    greedy=temperature == 0,
    top_k=int(top_k or 0),
    use_top_p=top_p < 1.0,
    use_min_p=min_p > 0.0,
    eos_id=eos_id,
    beam_size=beam_size if beam_size > 1 else 0,
    staged=staged,
  )


def abstract_program(abstract_params, model_cfg, mesh, s, prompt_len: int):
  """(jitted sampler, abstract arguments) of one `lmjax sample` call with config.sample `s` on a prompt of
  `prompt_len` tokens, for compiling ahead of time (lmjax plan): the program and shapes generate() would run."""
  n_per = s.beam_size if s.beam_size > 1 else s.num_samples
  slide = prompt_len + s.max_new_tokens > model_cfg.max_len
  P, chunk, R = _program_shape(
    model_cfg, prompt_len, s.max_new_tokens, 1, n_per, s.beam_size > 1, mesh, s.window_chunk, slide
  )
  st = _static(s.temperature, s.top_k, s.top_p, s.min_p, None, s.beam_size)
  shardings = (jax.tree.structure(abstract_params), tuple(x.sharding for x in jax.tree.leaves(abstract_params)))
  repl = parallel.replicated(mesh)
  shape = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=repl)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (abstract_params, shape((R, P), jnp.int32), shape((R, P), jnp.int32), shape((R,), jnp.int32))
  args += (shape((R,), jnp.bool_), shape(key.shape, key.dtype)) + (shape((), jnp.float32),) * 4
  return _compiled(model_cfg, chunk, st, shardings, mesh), args


# ------------------------------------------------------------------------------------------ checks


def available_memory_bytes() -> int:
  """Free memory of the first device: its allocator's limit minus use, or the host's available RAM on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  return hostenv.available_bytes()


def _check(cfg, prompts_ids, max_new_tokens, temperature, top_k, top_p, min_p, num_return_sequences, beam_size):
  if not prompts_ids:
    raise SampleError('no prompts given')
  if max_new_tokens < 1:
    raise SampleError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  for i, p in enumerate(prompts_ids):
    if len(p) == 0:
      raise SampleError(
        f'prompt {i} is empty: the model needs at least one token to condition on '
        '(give some text, or use a tokenizer with a BOS token)'
      )
    bad = [int(x) for x in p if not 0 <= int(x) < cfg.vocab_size]
    if bad:
      raise tokenizers.TokenizerError(
        f'prompt {i} holds ids {sorted(set(bad))[:10]} outside the vocabulary (0..{cfg.vocab_size - 1})'
      )
  if temperature < 0:
    raise SampleError(f'temperature must be >= 0 (0 = greedy), got {temperature}')
  if top_k is not None and top_k < 0:
    raise SampleError(f'top_k must be >= 1, or 0/None for off; got {top_k}')
  if not 0 < top_p <= 1:
    raise SampleError(f'top_p must be in (0, 1], got {top_p}')
  if not 0 <= min_p <= 1:
    raise SampleError(f'min_p must be in [0, 1], got {min_p}')
  if beam_size < 1:
    raise SampleError(f'beam_size must be >= 1, got {beam_size}')
  if num_return_sequences < 1:
    raise SampleError(f'num_return_sequences must be >= 1, got {num_return_sequences}')
  if beam_size > 1 and num_return_sequences > beam_size:
    raise SampleError(
      f'beam search returns at most beam_size={beam_size} sequences per prompt, '
      f'not num_return_sequences={num_return_sequences}'
    )


# Host bytes per generated token of one row: its id (int32) and the text decoded from it (a few UTF-8 bytes, and
# Python's str overhead while the rows are joined).
_OUTPUT_BYTES_PER_TOKEN = 16


def _check_memory(cfg, rows, cache_len, limit_bytes, max_new_tokens=0):
  cache_bytes = 2 * cfg.n_layers * rows * cfg.kv_heads * cache_len * cfg.head_size * jnp.dtype(cfg.dtype).itemsize
  if limit_bytes is None:
    limit_bytes = int(MEMORY_FRACTION * available_memory_bytes())
  if cache_bytes > limit_bytes:
    raise SampleError(
      f'the KV cache for {rows} rows (prompts x num_return_sequences x beam_size) of {cache_len} slots '
      f'would take {cache_bytes / 2**30:.2f} GiB, over the {limit_bytes / 2**30:.2f} GiB limit; '
      'sample fewer sequences per call'
    )
  out_bytes = rows * max_new_tokens * _OUTPUT_BYTES_PER_TOKEN
  if out_bytes > limit_bytes:
    raise SampleError(
      f'{rows} rows of max_new_tokens={max_new_tokens} would need {out_bytes / 2**30:.1f} GiB for the output alone, '
      f'over the {limit_bytes / 2**30:.2f} GiB limit; ask for fewer tokens or fewer samples'
    )


# ------------------------------------------------------------------------------------------ Python API


def window_chunk_len(model_cfg, window_chunk: int = 0) -> int:
  """Tokens per sliding-window chunk: `window_chunk`, or max_len // 4 when 0 (each token then sees >= 3/4 of the
  context, for one prefill per max_len // 4 tokens)."""
  chunk = window_chunk or max(model_cfg.max_len // 4, 1)
  if not 1 <= chunk < model_cfg.max_len:
    raise SampleError(
      f'window_chunk must be in [1, max_len={model_cfg.max_len}), got {chunk}: each chunk re-reads '
      'the last max_len - window_chunk tokens, so it needs at least one'
    )
  return chunk


def _left_pad(seqs, P):
  """(tokens_RxP, segs_RxP, lens_R) of R sequences of at most P tokens, right-aligned (pad slots: segment 0)."""
  tokens_RxP, segs_RxP = np.zeros((len(seqs), P), np.int32), np.zeros((len(seqs), P), np.int32)
  lens_R = np.array([len(q) for q in seqs], np.int32)
  for r, q in enumerate(seqs):
    tokens_RxP[r, P - len(q) :], segs_RxP[r, P - len(q) :] = q, 1
  return tokens_RxP, segs_RxP, lens_R


def generate(
  params,
  model_cfg,
  prompts_ids: Sequence[np.ndarray],
  *,
  max_new_tokens: int,
  temperature=1.0,
  top_k: Optional[int] = 0,
  top_p=1.0,
  min_p=0.0,
  eos_id: Optional[int] = None,
  num_return_sequences=1,
  seed=0,
  beam_size=1,
  length_penalty=0.6,
  mesh=None,
  staged=True,
  memory_limit_bytes=None,
  sliding_window=True,
  progress=False,
  window_chunk=0,
  executables=None,
):
  """Continuations of token prompts: a list of len(prompts) * num_return_sequences id lists, prompt-major
  (prompt i's j-th sample is at i * num_return_sequences + j). A row that emits `eos_id` ends with it.

  temperature 0 is greedy; top_k 0/None, top_p 1 and min_p 0 are off. beam_size > 1 runs beam search (sampling
  options are then ignored) and returns the num_return_sequences best beams, best first. With `mesh`, params
  keep their shardings and the prompts are replicated.

  When the longest prompt + max_new_tokens exceeds model_cfg.max_len, `sliding_window` generates in chunks of
  `window_chunk` tokens (0 = max_len // 4), each conditioned on the last max_len - window_chunk tokens of its row
  (a longer prompt keeps only its last max_len - window_chunk tokens); see the module docstring. With
  sliding_window=False such a request is a SampleError.

  `executables` (a compiling.ExecutableCache): the compiled program is read from / written to it under 'sample',
  keyed on lmjax's source, the model, the decoding options that shape the program, and the arguments' shapes and
  shardings, so a repeated `lmjax sample` neither traces nor compiles it (`executables.origin['sample']` says
  which happened).
  """
  top_k = top_k or 0
  _check(model_cfg, prompts_ids, max_new_tokens, temperature, top_k, top_p, min_p, num_return_sequences, beam_size)
  L = model_cfg.max_len
  longest = max(len(p) for p in prompts_ids)
  slide = longest + max_new_tokens > L
  if slide and (not sliding_window or beam_size > 1):
    why = (
      'beam search needs the whole sequence in one cache, so it cannot slide'
      if sliding_window
      else 'sliding_window=False'
    )
    raise SampleError(
      f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} '
      f'exceeds the model context max_len={L} and {why}; use --max_new_tokens<={max(L - longest, 0)}'
      f' or a shorter prompt{"" if sliding_window else ", or sliding_window=True"}'
    )
  n_per = beam_size if beam_size > 1 else num_return_sequences
  P, chunk, R = _program_shape(
    model_cfg, longest, max_new_tokens, len(prompts_ids), n_per, beam_size > 1, mesh, window_chunk, slide
  )
  rows = len(prompts_ids) * n_per
  _check_memory(model_cfg, R, P + chunk, memory_limit_bytes, max_new_tokens)

  st = _static(temperature, top_k, top_p, min_p, eos_id, beam_size, staged)
  # (treedef, leaves): a hashable key for the compile cache
  shardings = None if mesh is None else (jax.tree.structure(params), tuple(x.sharding for x in jax.tree.leaves(params)))
  fn = _compiled(model_cfg, chunk, st, shardings, mesh)
  options = (np.float32(temperature or 1.0), np.float32(top_p), np.float32(min_p), np.float32(length_penalty))

  program_key = repr((dataclasses.asdict(model_cfg), chunk, st))  # what the traced program depends on
  program = {}  # the compiled program, from the cache or compiled on the first call; every chunk reuses it

  def call(seqs, done_R, key):
    args = (params, *_left_pad(seqs, P), done_R, key, *options)
    with parallel.activate(mesh) if mesh is not None else contextlib.nullcontext():
      if executables is None:
        return np.asarray(fn(*args)[0])
      if 'exe' not in program:
        program['exe'] = executables.compile('sample', fn, args, key_extra=program_key)
      return np.asarray(program['exe'](*args)[0])

  prompts_R = [np.asarray(prompts_ids[min(r // n_per, len(prompts_ids) - 1)], np.int32)[-P:] for r in range(R)]
  done_R = np.zeros((R,), bool)
  if not slide:
    out_RxN = call(prompts_R, done_R, jax.random.key(seed))
  else:
    pad_id = eos_id if eos_id is not None else 0
    out_RxN = np.full((R, max_new_tokens), pad_id, np.int32)
    windows_R = prompts_R
    starts = range(0, max_new_tokens, chunk)
    bar = metrics.progress_bar(len(starts) * chunk, 'sampling', 'tok') if progress else None  # tokens per row
    for k, start in enumerate(starts):
      new_RxC = call(windows_R, done_R, jax.random.fold_in(jax.random.key(seed), k))
      n = min(chunk, max_new_tokens - start)  # the last chunk decodes a whole chunk and keeps what was asked for
      out_RxN[:, start : start + n] = new_RxC[:, :n]
      if bar is not None:
        bar.update(chunk)
      if eos_id is not None:
        done_R = done_R | np.any(new_RxC[:, :n] == eos_id, axis=1)
        if done_R[:rows].all():
          break
      windows_R = [np.concatenate([w, c])[-P:] for w, c in zip(windows_R, new_RxC)]
    if bar is not None:
      bar.close()
  out_RxN = out_RxN[:rows]
  if beam_size > 1:  # keep the best num_return_sequences of each prompt's beams (already sorted best first)
    out_RxN = out_RxN.reshape(len(prompts_ids), beam_size, -1)[:, :num_return_sequences].reshape(-1, max_new_tokens)
  results = []
  for row in out_RxN.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    results.append(row)
  return results


def sample_texts(params, model_cfg, tokenizer, prompts: Sequence[str], *, stop: Sequence[str] = (), **kwargs):
  """Text continuations of text prompts (same order as `generate`). Generation stops at the tokenizer's EOS; a
  continuation is cut before the first of the `stop` strings it contains. kwargs go to `generate`."""
  ids = []
  for text in prompts:
    p = tokenizer.encode(text)
    starts_with_bos = len(p) > 0 and p[0] == tokenizer.bos_id  # a chat template writes its own
    if (len(p) == 0 or tokenizer.adds_bos) and tokenizer.bos_id is not None and not starts_with_bos:  # as Llama's
      p = np.concatenate([np.array([tokenizer.bos_id], np.int32), p])
    ids.append(p)
  kwargs.setdefault('eos_id', tokenizer.eos_id)
  eos = kwargs['eos_id']
  texts = []
  for row in generate(params, model_cfg, ids, **kwargs):
    text = tokenizer.decode([t for t in row if t != eos])
    cuts = [text.find(s) for s in stop if s and s in text]
    texts.append(text[: min(cuts)] if cuts else text)
  return texts


# ------------------------------------------------------------------------------------------ `lmjax sample`


def _read_prompt_file(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 file, whatever the locale's encoding."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise SampleError(f'--prompt_file {path}: {e.strerror or e}') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw.count(b'\n', 0, e.start) + 1
    raise SampleError(
      f'--prompt_file {path}: not UTF-8 at byte {e.start} (line {line}: {e.reason}); save the file as UTF-8'
    ) from None
  lines = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')  # any line ending, as text mode reads
  prompts = [line for line in lines if line.strip()]
  if not prompts:
    raise SampleError(f'--prompt_file {path} holds no prompt (only blank lines); write one per line')
  return prompts


def run(args, overrides):
  """`lmjax sample`: loads the workdir's checkpoint (--step, default the latest) and prints the samples (flags override config.sample)."""
  import time  # pylint: disable=import-outside-toplevel
  from lmjax import inference  # pylint: disable=import-outside-toplevel  -- keeps `import lmjax.sample` light

  file_prompts = _read_prompt_file(args.prompt_file) if args.prompt_file else None  # before the checkpoint
  config, tokenizer, engine, state = inference.load_run(args.workdir, overrides, step=args.step, params=args.params)
  s, cfg = config.sample, engine.model_cfg
  cache_dir = config.train.compilation_cache_dir  # the run's caches serve its sampler too
  executables = compiling.ExecutableCache(cache_dir, {}) if cache_dir else None
  pick = lambda flag, key, default: flag if flag is not None else s.get(key, default)
  prompts = file_prompts or [pick(args.prompt, 'prompt', '\n')]
  shown = prompts
  if getattr(args, 'chat', False):  # the model sees the rendered conversation; the user's text is what is printed
    from lmjax import chat  # pylint: disable=import-outside-toplevel

    template = chat.Template(chat.resolve(config.data.get('chat_template', ''), tokenizer), tokenizer)
    prompts = [template.prompt(p) for p in prompts]
  max_new = int(pick(args.max_new_tokens, 'max_new_tokens', 500))
  n = pick(args.num_samples, 'num_samples', 1)
  beam_size = pick(args.beam_size, 'beam_size', 1)
  sliding, window_chunk = bool(s.get('sliding_window', True)), int(s.get('window_chunk', 0))
  longest = max(len(tokenizer.encode(p)) or 1 for p in prompts)
  if sliding and beam_size <= 1 and longest + max_new > cfg.max_len:
    keep = cfg.max_len - window_chunk_len(cfg, window_chunk)
    print(
      f'lmjax sample: prompt ({longest} tokens) + max_new_tokens ({max_new}) exceed the model context '
      f'max_len={cfg.max_len}: sliding window, every new token sees at least the {keep} tokens before it'
      + (f'; prompts longer than {keep} tokens keep only their last {keep}' if longest > keep else ''),
      file=sys.stderr,
    )
  t0 = time.perf_counter()
  texts = sample_texts(
    state.params,
    cfg,
    tokenizer,
    prompts,
    stop=[*args.stop, *s.get('stop', ())],
    max_new_tokens=max_new,
    temperature=0.0 if args.greedy else pick(args.temperature, 'temperature', 1.0),
    top_k=pick(args.top_k, 'top_k', 0),
    top_p=pick(args.top_p, 'top_p', 1.0),
    min_p=pick(args.min_p, 'min_p', 0.0),
    num_return_sequences=n,
    seed=args.seed,
    beam_size=beam_size,
    length_penalty=args.length_penalty,
    mesh=engine.mesh,
    sliding_window=sliding,
    window_chunk=window_chunk,
    progress=True,
    executables=executables,
  )
  seconds = time.perf_counter() - t0
  hostenv.mark('generated')
  for i, text in enumerate(texts):
    prompt = shown[i // n]
    if args.format == 'jsonl':
      print(json.dumps({'prompt': prompt, 'sample': i % n, 'text': text}))
    else:
      print(prompt + text)
      print('-' * 40)
  # Upper bound on tokens (rows may stop early at EOS or a stop string); includes compilation on a first call.
  rows = len(prompts) * n
  origin = executables.origin.get('sample', 'compiled') if executables is not None else 'compiled'
  print(
    f'lmjax sample: {rows} x {max_new} tokens in {seconds:.2f}s ({rows * max_new / seconds:.0f} tokens/s, '
    f'sampler {compiling.ORIGINS[origin]}, included)',
    file=sys.stderr,
  )
