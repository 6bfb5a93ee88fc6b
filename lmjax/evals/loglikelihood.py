"""Log-likelihoods of continuations given contexts, as lm-evaluation-harness computes them for a causal model,
batched and jitted on a run's mesh; and multiple-choice accuracy from them.

The harness's rules, followed exactly (lm_eval/api/model.py `_encode_pair`, lm_eval/models/huggingface.py
`_loglikelihood_tokens`):
  - whitespace at the end of the context moves to the start of the continuation; the continuation's tokens are
    those of encode(context + continuation) after the first len(encode(context)) (so a merge across the
    boundary is split the same way);
  - an empty context becomes the tokenizer's BOS (else EOS), unless the continuation starts with that token, in
    which case the continuation's first token is the context. A tokenizer with neither (char) does the same:
    the continuation's first token is conditioned on, not scored. Where the tokenizer's own post-processor
    starts a sequence with BOS (`tokenizer.adds_bos`, Llama's), or bos=True is asked for (the harness's
    add_bos_token=True), every non-empty context starts with BOS;
  - context + continuation longer than max_len + 1 tokens loses its oldest context tokens; a continuation longer
    than max_len is an error;
  - the score is the summed log-softmax of the continuation's tokens, and `greedy` says each of them is the
    argmax at its position.

How it runs: requests that share a context (the choices of one item) share one prefill. Contexts are
left-padded into rows of a few bucketed lengths P, run once to fill a KV cache and to give the log-probabilities
of each continuation's first token (the output head runs at the last position only); the cache rows are then
copied to the continuations, which run right-padded to a bucketed length C at cache slot P. Every call has the
same rows (I contexts, R continuations, fixed per set of requests), so the compiled shapes are the few (P, C)
pairs the data needs. Pad slots get segment id 0 and are seen by no real token, as in lmjax/sample.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmjax import model as model_lib, parallel
from lmjax.errors import DataError

_MIN_CONTEXT, _MIN_FED = 16, 8  # the shortest padded context, and continuation after its first token


def bucket(n: int, least: int) -> int:
  """The padded length of n tokens: the first power of two >= max(n, least), 0 for 0. Powers of two pad by 1.33x
  on average and give a handful of compiled shapes over any spread of lengths."""
  return 0 if n <= 0 else 1 << (max(n, least) - 1).bit_length()


# ------------------------------------------------------------------------------------------ tokenization


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = False) -> tuple[list, list]:
  """(context ids, continuation ids) by the harness's rules (module docstring)."""
  prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    cont = tokenizer.encode(continuation).tolist()
    if prefix is not None and (not cont or cont[0] != prefix):
      return [prefix], cont
    return cont[:1], cont[1:]
  head = [tokenizer.bos_id] if (bos or getattr(tokenizer, 'adds_bos', False)) and tokenizer.bos_id is not None else []
  context_ids = head + tokenizer.encode(context).tolist()
  whole = head + tokenizer.encode(context + continuation).tolist()
  return context_ids, whole[len(context_ids) :]


def window(context_ids: list, continuation_ids: list, max_len: int, where: str = '') -> tuple[tuple, tuple]:
  """The harness's window of max_len + 1 tokens: the oldest context tokens go first."""
  C = len(continuation_ids)
  if C == 0:
    raise DataError(
      f'{where}: the continuation has no token to score (an empty query and a one-token choice, with a '
      'tokenizer without BOS); give the item a query'
    )
  if C > max_len:
    raise DataError(f'{where}: a choice of {C} tokens does not fit the model context of {max_len}; shorten it')
  keep = max_len + 1 - C
  return tuple(context_ids[-keep:]), tuple(continuation_ids)


# ------------------------------------------------------------------------------------------ the compiled program


def _take_rows(cache, rows_R, scan_layers: bool):
  axis = 1 if scan_layers else 0
  return jax.tree.map(lambda x: jnp.take(x, rows_R, axis=axis), cache)


def _pad_time(cache, size):
  return jax.tree.map(lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - x.shape[-2]), (0, 0)]), cache)


def _score(params, ctx_IxP, ctx_len_I, group_R, cont_RxC, cont_len_R, *, cfg):
  """(summed log p of each continuation, all its tokens greedy). ctx_IxP left-padded contexts; cont_RxC the
  continuations right-padded, with C = (fed tokens) + 1: token 0 is scored from the context's last position,
  token j > 0 from the fed token j - 1."""
  model = model_lib.Transformer(cfg)
  I, P = ctx_IxP.shape
  R, C = cont_RxC.shape
  start_I = P - ctx_len_I
  segs_IxP = (jnp.arange(P, dtype=jnp.int32)[None] >= start_I[:, None]).astype(jnp.int32)
  pos_IxP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None] - start_I[:, None], 0)
  last_Ix1 = jnp.full((I, 1), P - 1, jnp.int32)
  logits_Ix1xV, cache = model.apply(
    {'params': params},
    ctx_IxP,
    pos_IxP,
    segs_IxP,
    cache=model_lib.init_cache(cfg, I, P),
    cache_index=0,
    kv_segment_ids_BxT=segs_IxP,
    logits_at_BxS=last_Ix1,
  )
  logp_IxV = jax.nn.log_softmax(logits_Ix1xV[:, 0], axis=-1)
  logp_RxV = jnp.take(logp_IxV, group_R, axis=0)
  first_R = cont_RxC[:, 0]
  ll_R = jnp.take_along_axis(logp_RxV, first_R[:, None], axis=1)[:, 0]
  greedy_R = jnp.argmax(logp_RxV, axis=-1) == first_R
  if C == 1:
    return ll_R, greedy_R

  F = C - 1  # tokens fed after the context
  fed_RxF, target_RxF = cont_RxC[:, :F], cont_RxC[:, 1:]
  cache = _pad_time(_take_rows(cache, group_R, cfg.scan_layers), P + F)
  ones_RxF = jnp.ones((R, F), jnp.int32)
  pos_RxF = jnp.minimum(jnp.take(ctx_len_I, group_R)[:, None] + jnp.arange(F, dtype=jnp.int32)[None], cfg.max_len - 1)
  logits_RxFxV, _ = model.apply(
    {'params': params},
    fed_RxF,
    pos_RxF,
    ones_RxF,
    cache=cache,
    cache_index=P,
    kv_segment_ids_BxT=jnp.concatenate([jnp.take(segs_IxP, group_R, axis=0), ones_RxF], axis=1),
  )
  logp_RxFxV = jax.nn.log_softmax(logits_RxFxV, axis=-1)
  tok_RxF = jnp.take_along_axis(logp_RxFxV, target_RxF[:, :, None], axis=2)[:, :, 0]
  valid_RxF = jnp.arange(F, dtype=jnp.int32)[None] < (cont_len_R - 1)[:, None]
  ll_R = ll_R + jnp.sum(jnp.where(valid_RxF, tok_RxF, 0.0), axis=1)
  greedy_R = greedy_R & jnp.all((jnp.argmax(logp_RxFxV, axis=-1) == target_RxF) | ~valid_RxF, axis=1)
  return ll_R, greedy_R


@dataclasses.dataclass
class _Call:
  groups: list  # context tuples, in row order
  rows: list  # (request index, group row, continuation)


class Scorer:
  """Scores (context ids, continuation ids) requests with a Task's model on its mesh. One jitted program; it
  compiles once per (context bucket, continuation bucket, rows) shape."""

  def __init__(self, task, tokens_per_call: int = 0):
    self.task, self.cfg = task, task.model_cfg
    # The run's eval batch (rows x max_len tokens) sizes a call: memory the run's evaluation already needs.
    self.tokens_per_call = tokens_per_call or task.config.train.eval_batch_size * self.cfg.max_len
    mesh = task.mesh
    rows, rows2 = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES)), parallel.batch_sharding(mesh, 2)
    self._shardings = (rows2, rows, rows, rows2, rows)
    self._fn = jax.jit(
      parallel.traced_with(functools.partial(_score, cfg=self.cfg), mesh, task.rules),
      in_shardings=(task.param_shardings, *self._shardings),
      out_shardings=parallel.replicated(mesh),
    )
    self.shapes = set()  # (I, P, R, C) of every call so far: the compiled programs

  def _sizes(self, requests) -> tuple[int, int]:
    """(I, R): contexts and continuations per call, multiples of the batch-sharding devices."""
    d = self.task.batch_rows_divisor
    longest = max(bucket(len(c), _MIN_CONTEXT) + bucket(len(k) - 1, _MIN_FED) for c, k in requests)
    R = max(d, self.tokens_per_call // max(longest, 1) // d * d)
    R = min(R, -(-len(requests) // d) * d)
    n_contexts = len({c for c, _ in requests})
    I = min(R, -(-math.ceil(R * n_contexts / len(requests)) // d) * d)
    return I, R

  def _calls(self, requests, I: int, R: int):
    """Requests, longest context first, into calls of at most I contexts and R continuations."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]), requests[i][0], i))
    calls, current, index = [], _Call([], []), {}
    for i in order:
      ctx, cont = requests[i]
      if len(current.rows) == R or (ctx not in index and len(current.groups) == I):
        calls.append(current)
        current, index = _Call([], []), {}
      if ctx not in index:
        index[ctx] = len(current.groups)
        current.groups.append(ctx)
      current.rows.append((i, index[ctx], cont))
    calls.append(current)
    return calls

  def __call__(self, params, requests, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float64[N], greedy bool[N]) of N requests (context ids, continuation ids), already
    windowed (`window`). `progress(n)` is told of every n requests done."""
    ll, greedy = np.zeros(len(requests)), np.zeros(len(requests), bool)
    if not requests:
      return ll, greedy
    I, R = self._sizes(requests)
    with parallel.activate(self.task.mesh, self.task.rules):
      for call in self._calls(requests, I, R):
        P = bucket(max(len(g) for g in call.groups), _MIN_CONTEXT)
        C = bucket(max(len(c) for _, _, c in call.rows) - 1, _MIN_FED) + 1
        ctx_IxP, ctx_len_I = np.zeros((I, P), np.int32), np.ones(I, np.int32)
        for g, ids in enumerate(call.groups):
          ctx_IxP[g, P - len(ids) :], ctx_len_I[g] = ids, len(ids)
        group_R, cont_RxC, cont_len_R = np.zeros(R, np.int32), np.zeros((R, C), np.int32), np.ones(R, np.int32)
        for r, (_, g, ids) in enumerate(call.rows):
          group_R[r], cont_RxC[r, : len(ids)], cont_len_R[r] = g, ids, len(ids)
        args = [_global(x, s) for x, s in zip((ctx_IxP, ctx_len_I, group_R, cont_RxC, cont_len_R), self._shardings)]
        self.shapes.add((I, P, R, C))
        ll_R, greedy_R = jax.device_get(self._fn(params, *args))
        n = len(call.rows)
        idx = [i for i, _, _ in call.rows]
        ll[idx], greedy[idx] = ll_R[:n], greedy_R[:n]
        if progress is not None:
          progress(n)
    return ll, greedy


def _global(x: np.ndarray, sharding):
  """A global array from a numpy array every process holds whole."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ------------------------------------------------------------------------------------------ multiple choice


def choice_requests(tokenizer, items, max_len: int, bos: bool = False) -> list[tuple[tuple, tuple]]:
  """One windowed request per (item, choice): the query as context, " " + choice as continuation."""
  out, cache = [], {}
  for item in items:
    for k, choice in enumerate(item.choices):
      key = (item.query, choice)
      if key not in cache:
        ctx, cont = encode_pair(tokenizer, item.query, ' ' + choice, bos)
        cache[key] = window(ctx, cont, max_len, f'{item.where} (choice {k})')
      out.append(cache[key])
  return out


def choice_results(items, ll: np.ndarray, greedy: np.ndarray) -> list[dict]:
  """Per item: the choices' log-likelihoods and the harness's picks. acc: the highest log-likelihood; acc_norm:
  the highest log-likelihood per character of the choice (its length without the leading space, as the
  harness's len(choice)). Ties go to the first choice (numpy argmax). A one-choice item (LAMBADA) is right
  when its continuation is greedy."""
  out, at = [], 0
  for item in items:
    n = len(item.choices)
    lls, greedy_k = ll[at : at + n], greedy[at : at + n]
    at += n
    if n == 1:
      out.append({'ll': [float(lls[0])], 'greedy': [bool(greedy_k[0])], 'acc': float(greedy_k[0])})
      continue
    with np.errstate(divide='ignore', invalid='ignore'):
      per_char = lls / np.array([float(len(c)) for c in item.choices])
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(per_char))
    out.append(
      {
        'll': [float(x) for x in lls],
        'greedy': [bool(x) for x in greedy_k],
        'pred': pred,
        'pred_norm': pred_norm,
        'acc': float(pred == item.gold),
        'acc_norm': float(pred_norm == item.gold),
      }
    )
  return out


def choice_metrics(items, results) -> dict:
  """acc and acc_norm (with the harness's standard errors) and n; for one-choice items (LAMBADA), acc (greedy)
  and ppl = exp(-mean log-likelihood), as the harness's output_type: loglikelihood."""
  n = len(items)
  single = [len(i.choices) == 1 for i in items]
  if any(single) and not all(single):
    first = items[single.index(True)]
    raise DataError(
      f'{first.where} has one choice but other items have several: a file is either multiple choice (two choices '
      'or more per item) or LAMBADA-style (one continuation per item)'
    )
  out = {}
  keys = ('acc',) if all(single) else ('acc', 'acc_norm')
  for key in keys:
    values = np.array([r[key] for r in results])
    out[key] = float(values.mean())
    out[f'{key}_stderr'] = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
  if all(single):
    out['ppl'] = float(math.exp(-np.mean([r['ll'][0] for r in results])))
  out['n'] = n
  return out


def progress_bar(total: int, desc: str):
  """A tqdm bar on stderr when it is a terminal, else None."""
  if not sys.stderr.isatty():
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, unit='req', leave=False, dynamic_ncols=True)
