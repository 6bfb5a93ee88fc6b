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

How it runs: the continuations that share a context (the choices of one item) share one row: the context, then
each continuation's tokens but its last, back to back. The context has a negative segment id, which every later
token sees (lmjax/attention.py make_mask); each continuation has its own, so it sees the context and itself only,
and its positions start where the context ends -- the same numbers as one row per request, at the cost of one.
The output head runs only where a log-probability is read (lmjax/model.py logits_at_BxS): the context's last
position and each continuation's fed tokens. Rows are sorted by length and go I to a call, padded to a
bucketed length T with S read positions (`bucket`), so the compiled programs are the few (T, S) the data needs; pad
slots get segment id 0 and are seen by no real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import model as model_lib, parallel
from lmjax.errors import DataError

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

SHARED = -1  # the segment id of a row's context (make_mask's shared prefix)
_MIN_ROW, _MIN_READ = 16, 8  # the shortest padded row, and the fewest read positions


def bucket(n: int, least: int) -> int:
  """The padded length of n: the first of 16, 24, 32, 48, 64, 96, ... (powers of two and 3/4 of them) that is
  >= max(n, least). Padding costs 1.2x on average, and any spread of lengths needs only a handful of programs."""
  n = max(n, least)
  p = 1 << (n - 1).bit_length()
  return p * 3 // 4 if p >= 32 and p * 3 // 4 >= n else p


def _score(params, tokens_IxT, segs_IxT, pos_IxT, at_IxS, target_IxS, *, cfg):
  """(log p, greedy) of the tokens target_IxS, predicted at row slots at_IxS."""
  I, T = tokens_IxT.shape
  model = model_lib.Transformer(cfg)
  logits_IxSxV, _ = model.apply(
    {'params': params},
    tokens_IxT,
    pos_IxT,
    segs_IxT,
    cache=model_lib.init_cache(cfg, I, T),  # a cache only for its explicit mask, which knows shared prefixes
    cache_index=0,
    kv_segment_ids_BxT=segs_IxT,
    logits_at_BxS=at_IxS,
  )
  logp_IxSxV = jax.nn.log_softmax(logits_IxSxV, axis=-1)
  ll_IxS = jnp.take_along_axis(logp_IxSxV, target_IxS[:, :, None], axis=2)[:, :, 0]
  return ll_IxS, jnp.argmax(logp_IxSxV, axis=-1) == target_IxS


@dataclasses.dataclass
class _Row:
  """A context, then continuations that condition on it: token ids, segment ids, positions, and the reads
  (slot, target token, request index) whose log-probabilities make each request's score."""

  n_context: int
  tokens: list
  segs: list
  pos: list
  reads: list
  n_continuations: int = 0

  @classmethod
  def start(cls, context):
    n = len(context)
    return cls(n, list(context), [SHARED] * n, list(range(n)), [])

  def add(self, request: int, continuation):
    """Token 0 of the continuation is read at the context's last slot, token j at the slot of token j - 1; its
    last token is read, never fed."""
    fed = list(continuation[:-1])
    slots = [self.n_context - 1, *range(len(self.tokens), len(self.tokens) + len(fed))]
    self.reads += [(slot, tok, request) for slot, tok in zip(slots, continuation)]
    self.n_continuations += 1
    self.tokens += fed
    self.segs += [self.n_continuations] * len(fed)
    self.pos += range(self.n_context, self.n_context + len(fed))


def rows_of(requests, longest: int) -> list[_Row]:
  """Requests grouped by context into rows of at most `longest` slots (a context with more continuations than
  fit starts another row), longest row first."""
  groups = {}
  for i, (ctx, cont) in enumerate(requests):
    groups.setdefault(ctx, []).append((i, cont))
  rows = []
  for ctx, members in groups.items():
    row = _Row.start(ctx)
    for i, cont in members:
      if row.n_continuations and len(row.tokens) + len(cont) - 1 > longest:
        rows.append(row)
        row = _Row.start(ctx)
      row.add(i, cont)
    rows.append(row)
  return sorted(rows, key=lambda r: -len(r.tokens))


class Scorer:
  """Scores (context ids, continuation ids) requests with an Engine's model on its mesh. One jitted program; it
  compiles once per shape (I, T, S), `shapes`."""

  def __init__(self, engine, tokens_per_call: int = 0):
    self.engine, self.cfg = engine, engine.model_cfg
    # The run's eval batch (rows x max_len tokens) sizes a call: memory the run's evaluation already needs.
    self.tokens_per_call = tokens_per_call or engine.config.train.eval_batch_size * self.cfg.max_len
    self.longest_row = max(self.cfg.max_len, 256)
    mesh = engine.mesh
    self._rows = parallel.batch_sharding(mesh, 2)
    self._fn = jax.jit(
      parallel.traced_with(functools.partial(_score, cfg=self.cfg), mesh, engine.rules),
      in_shardings=(engine.param_shardings,) + (self._rows,) * 5,
      out_shardings=parallel.replicated(mesh),
    )
    self.shapes = set()  # (I, T, S) of every call so far: the compiled programs

  def __call__(self, params, requests, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float64[N], greedy bool[N]) of N requests (context ids, continuation ids), already
    windowed (`window`). `progress(n)` is told of every n requests done."""
    ll, wrong = np.zeros(len(requests)), np.zeros(len(requests), np.int64)
    if not requests:
      return ll, wrong == 0
    rows = rows_of(requests, self.longest_row)
    d = self.engine.batch_rows_divisor
    I = max(d, self.tokens_per_call // bucket(len(rows[0].tokens), _MIN_ROW) // d * d)
    I = min(I, -(-len(rows) // d) * d)
    with parallel.activate(self.engine.mesh, self.engine.rules):
      for k in range(0, len(rows), I):
        call = rows[k : k + I]
        T = bucket(max(len(r.tokens) for r in call), _MIN_ROW)
        S = bucket(max(len(r.reads) for r in call), _MIN_READ)
        arrays = [np.zeros((I, T), np.int32) for _ in range(3)] + [np.zeros((I, S), np.int32) for _ in range(2)]
        tokens, segs, pos, at, target = arrays
        owner = np.full((I, S), -1)
        for r, row in enumerate(call):
          n, m = len(row.tokens), len(row.reads)
          tokens[r, :n], segs[r, :n], pos[r, :n] = row.tokens, row.segs, row.pos
          at[r, :m], target[r, :m], owner[r, :m] = zip(*row.reads)
        self.shapes.add((I, T, S))
        ll_IxS, greedy_IxS = jax.device_get(self._fn(params, *(_global(x, self._rows) for x in arrays)))
        read = owner >= 0
        np.add.at(ll, owner[read], ll_IxS[read])
        np.add.at(wrong, owner[read], ~greedy_IxS[read])
        if progress is not None:
          progress(len({int(o) for o in owner[read]}))
    return ll, wrong == 0


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
