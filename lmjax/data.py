"""Data: documents -> tokens -> seeded, checkpointable Grain batches; fixed eval batches.

Two ways to cut text into training rows of max_len tokens (data.rows):
  windows -- continuous text (tiny_shakespeare: one document per split), as nanoGPT: a row is any window of
             max_len + 1 tokens (inputs its first max_len, targets its last max_len); Grain shuffles the windows.
  packed  -- many documents (lm1b, c4, text files): Grain shuffles the documents, each process takes its slice
             (`[process_index::process_count]`, so a host reads only its documents), tokenizes them into inputs
             [BOS] + ids / targets ids + [EOS] (lmjax/tokenizers.py) and packs them back to back into rows
             (grain's ConcatThenSplitIterDataset: nothing dropped, a document that does not fit continues in the
             next row). Each row has segment_ids (1, 2, ... per document piece) and positions restarting at 0 in
             every piece, so attention never crosses a document (lmjax/model.py).
Either way the iterator's state is a few integers that lmjax/checkpoint.py saves, and a resumed run sees exactly
the batches an uninterrupted one would have seen.

A mixture (data.sources) reads every source this way with one shared tokenizer, and lmjax/mixture.py draws each
row of a batch from one of them by weight; each source with an eval split is also evaluated alone.

Eval rows are fixed: the eval split in order, cut the same way but never shuffled. Bits per byte divide the
summed loss by the UTF-8 bytes of exactly the documents whose every target is evaluated.

Batches are dicts of numpy arrays, local to this process:
  inputs_BxL, targets_BxL (int32); packed adds segment_ids_BxL, positions_BxL (int32) and weights_BxL (float32);
  eval batches always have weights_BxL (0 marks padding and any document cut off by train.eval_max_batches).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterator

import grain
import grain.experimental as grain_exp
import jax
import numpy as np

from lmjax import config as config_lib, mixture, sources, tokenizers

ROWS = config_lib.ROWS
# The arrays of a training batch for each kind of row, with their dtypes: known before any batch is read, so the
# train step can compile while a resumed iterator is still being restored.
TRAIN_KEYS = {
  'windows': {'inputs': np.int32, 'targets': np.int32},
  'packed': {
    'inputs': np.int32,
    'targets': np.int32,
    'segment_ids': np.int32,
    'positions': np.int32,
    'weights': np.float32,
  },
}


@dataclasses.dataclass
class Data:
  tokenizer: object
  train_iter: Iterator[dict]  # a grain DatasetIterator: get_state()/set_state() make it resumable
  eval_batches: list  # fixed list of local eval batches (padded rows weighted 0)
  eval_bytes_per_token: float  # UTF-8 bytes of the eval text per weighted eval target: nats/token -> bits/byte
  train_keys: dict  # TRAIN_KEYS of these rows: {name: dtype} of every array in a training batch
  rows_per_epoch: float = 0.0  # training rows in one pass over the train split (counted only with train.epochs)
  # a mixture's sources with an eval split: {name: (their eval batches, bytes per token)}; eval_batches holds them all
  source_evals: dict = dataclasses.field(default_factory=dict)


def make_data(config, tokenizer=None, *, workdir=None, process_index=None, process_count=None) -> Data:
  """Builds tokenizer (unless given: a resumed run passes the recorded one), train iterator and eval batches.

  workdir: where a tokenizer that must be trained (SentencePiece) caches its model (unless data.tokenizer_dir)."""
  dc, tc = config.data, config.train
  if dc.rows not in ROWS:
    raise sources.DataError(f'data.rows must be one of {ROWS}, got {dc.rows!r}')
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if dc.sources:
    return mixture_data(config, tokenizer, workdir, pi, pc)
  train_docs, eval_docs = sources.documents(dc, dc.train_split), sources.documents(dc, dc.eval_split)
  L = config.model.max_len
  if dc.rows == 'windows':
    train_text = _join(train_docs)
    tokenizer = _tokenizer(dc, tokenizer, lambda: [train_text], workdir, pi, pc)
    train_ids = tokenizer.encode(train_text)
    if len(train_ids) < L + 1:
      raise sources.DataError(
        f'the train split has {len(train_ids)} tokens, fewer than one row of max_len + 1 = {L + 1}'
      )
    return Data(
      tokenizer,
      train_iterator(train_ids, L, tc.batch_size, config.seed, dc.window_stride, pi, pc),
      *eval_set(config, tokenizer, eval_docs, pi, pc),
      train_keys=TRAIN_KEYS['windows'],
      rows_per_epoch=len(train_ids) / L,  # as nanoGPT counts epochs: tokens / row length
    )
  # The tokenizer trains on documents in a fixed shuffled order, so a capped sample (spm_train_chars) is unbiased.
  sample = lambda: (
    DocumentEncoder.text(train_docs[int(i)]) for i in grain.MapDataset.range(len(train_docs)).shuffle(seed=0)
  )
  tokenizer = _tokenizer(dc, tokenizer, sample, workdir, pi, pc)
  encode = encoder(config, tokenizer)
  rows = packed_rows(train_docs, encode, L, config.seed, pi, pc, read_threads=dc.read_threads)
  train_it = iter(rows.batch(_local_batch(tc.batch_size, pc), drop_remainder=True))
  batches, bytes_per_token = eval_set(config, tokenizer, eval_docs, pi, pc)
  # Packing splits documents across rows and drops nothing, so a pass is its tokens over the row length.
  per_epoch = sum(len(encode(train_docs[i])['inputs']) for i in range(len(train_docs))) / L if tc.epochs else 0.0
  return Data(tokenizer, train_it, batches, bytes_per_token, TRAIN_KEYS['packed'], math.ceil(per_epoch))


def mixture_data(config, tokenizer, workdir, pi: int, pc: int) -> Data:
  """make_data of data.sources: each source read and cut into rows as a lone dataset is, one tokenizer trained on
  them all, the rows drawn by weight (lmjax/mixture.py); each source with an eval split evaluated alone too."""
  dc, tc, L = config.data, config.train, config.model.max_len
  mix = mixture.sources(config)
  train_docs = {s.name: _source_documents(s, s.data.train_split) for s in mix}
  if dc.rows == 'windows':
    texts = {name: _join(docs) for name, docs in train_docs.items()}
    tokenizer = _tokenizer(dc, tokenizer, lambda: list(texts.values()), workdir, pi, pc)
    rows = []
    for s in mix:
      ids = tokenizer.encode(texts[s.name])
      if len(ids) < L + 1:
        raise sources.DataError(
          f'data.sources {s.name!r}: its train split has {len(ids)} tokens, fewer than one row of max_len + 1 = {L + 1}'
        )
      rows.append(iter(window_rows(ids, L, s.seed, dc.window_stride, pi, pc)))
  else:
    # Each source in a fixed shuffled order, interleaved, so a capped tokenizer sample (spm_train_chars) holds all.
    shuffled = lambda docs: (docs[int(i)] for i in grain.MapDataset.range(len(docs)).shuffle(seed=0))
    sample = lambda: (
      DocumentEncoder.text(d)
      for group in itertools.zip_longest(*map(shuffled, train_docs.values()))
      for d in group
      if d is not None
    )
    tokenizer = _tokenizer(dc, tokenizer, sample, workdir, pi, pc)
    encode = DocumentEncoder(tokenizer)
    rows = [iter(packed_rows(train_docs[s.name], encode, L, s.seed, pi, pc, read_threads=dc.read_threads)) for s in mix]
  _local_batch(tc.batch_size, pc)  # a batch that does not split over the processes fails here
  train_it = mixture.MixtureIterator(
    [s.name for s in mix], rows, mixture.stages(dc), config.seed, tc.batch_size, pi, pc
  )
  batches, bytes_per_token, per_source = mixture_evals(config, tokenizer, mix, pi, pc)
  return Data(tokenizer, train_it, batches, bytes_per_token, TRAIN_KEYS[dc.rows], source_evals=per_source)


def mixture_evals(config, tokenizer, mix, pi=None, pc=None) -> tuple[list, float, dict]:
  """(all eval batches, their pooled bytes per target, {name: (batches, bytes per target)}) of the sources of a
  mixture that have an eval split."""
  per_source, n_bytes, n_targets = {}, 0, 0
  for s in mix:
    if s.data.eval_split:
      batches, b, n = eval_counts(config, tokenizer, _source_documents(s, s.data.eval_split), pi, pc)
      per_source[s.name] = (batches, b / n)
      n_bytes, n_targets = n_bytes + b, n_targets + n
  if not per_source:
    raise sources.DataError(
      "data.sources: no source has an eval_split; give at least one (an eval_split of '' skips one)"
    )
  return [b for source_batches, _ in per_source.values() for b in source_batches], n_bytes / n_targets, per_source


def _source_documents(source, split: str):
  """A mixture source's documents; an error names the source."""
  try:
    return sources.documents(source.data, split)
  except sources.DataError as e:
    raise sources.DataError(f'data.sources {source.name!r}: {e}') from None


def _join(docs) -> str:
  return ''.join(docs[i] for i in range(len(docs)))


def _tokenizer(dc, tokenizer, texts, workdir, pi=0, pc=1):
  if tokenizer is None:
    return tokenizers.build(dc, texts, workdir, process_index=pi, process_count=pc)
  return tokenizers.check_config(tokenizer, dc)


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(
      f'train.batch_size ({global_batch}) must be divisible by the number of processes ({process_count})'
    )
  return global_batch // process_count


# ------------------------------------------------------------------------------------------ continuous text


def train_iterator(ids: np.ndarray, L: int, global_batch: int, seed: int, stride: int, pi: int, pc: int):
  """Seeded shuffled windows, batched; this process's rows of each global batch. Infinite.

  Shuffle before repeat: Grain then draws a fresh permutation per epoch (seed + epoch), lazily, and the order
  never depends on the run's length, so extending train.steps on resume keeps the data order.
  """
  return iter(window_rows(ids, L, seed, stride, pi, pc).batch(_local_batch(global_batch, pc), drop_remainder=True))


def window_rows(ids: np.ndarray, L: int, seed: int, stride: int, pi: int, pc: int):
  """MapDataset of this process's seeded shuffled windows (rows of max_len + 1 tokens, split into inputs and
  targets), unbatched. Infinite."""
  n_windows = (len(ids) - L - 1) // stride + 1

  def window(i):
    start = int(i) * stride
    row = ids[start : start + L + 1]
    return {'inputs': row[:-1], 'targets': row[1:]}

  ds = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat()
  return ds[pi::pc].map(window)


def _eval_rows(ids: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping rows covering every token of the split once as a target (last row zero-padded)."""
  n_rows = math.ceil((len(ids) - 1) / L)
  padded = np.zeros(n_rows * L + 1, np.int32)
  padded[: len(ids)] = ids
  w = np.zeros(n_rows * L, np.float32)
  w[: len(ids) - 1] = 1.0
  idx = np.arange(n_rows)[:, None] * L + np.arange(L)[None, :]
  return np.stack([padded[idx], padded[idx + 1]]), w[idx]


def eval_rows_batches(ids: np.ndarray, L: int, global_batch: int, max_batches: int, pi: int, pc: int) -> list:
  (inputs, targets), weights = _eval_rows(ids, L)
  return _eval_batches({'inputs': inputs, 'targets': targets, 'weights': weights}, global_batch, max_batches, pi, pc)


def _eval_batches(rows: dict, global_batch: int, max_batches: int, pi: int, pc: int) -> list:
  """Rows (dict of N x L arrays) -> this process's slice of each global batch; the last batch padded with zero
  rows (weight 0)."""
  n = len(rows['inputs'])
  n_batches = math.ceil(n / global_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  pad = n_batches * global_batch - n
  if pad > 0:
    rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
  local = _local_batch(global_batch, pc)
  return [
    {k: v[b * global_batch + pi * local : b * global_batch + (pi + 1) * local] for k, v in rows.items()}
    for b in range(n_batches)
  ]


# ------------------------------------------------------------------------------------------ packed documents


class DocumentEncoder:
  """One document -> {'inputs', 'targets', 'weights'} of equal length (see lmjax/tokenizers.py for the specials).

  A document is a text, or a prompt/completion pair (data.dataset='jsonl'): the pair is encoded as prompt ids then
  completion ids (each encoded alone, so the split between them is exact) and only targets that are completion
  tokens (and the EOS after them) carry weight: the loss never trains the model to write the prompt. A tokenizer
  without BOS/EOS (char) predicts each document's tokens after its first."""

  def __init__(self, tokenizer, template=None):
    self.tokenizer, self.template = tokenizer, template  # template: a chat.Template for conversations

  def __call__(self, doc) -> dict:
    tok = self.tokenizer
    if isinstance(doc, dict) and 'messages' in doc:  # the template places every special token itself
      if self.template is None:  # a mixture's sources are encoded without one
        raise sources.DataError(
          "conversations (data.dataset='chat') train as the one dataset, not a data.sources entry"
        )
      e = self.template.encode(doc['messages'], doc.get('where', 'a conversation'))
      return {'inputs': e['ids'][:-1], 'targets': e['ids'][1:], 'weights': e['assistant'][1:].astype(np.float32)}
    if isinstance(doc, str):
      prompt, ids = np.zeros(0, np.int32), tok.encode(doc)
    else:
      prompt, ids = tok.encode(doc['prompt']), tok.encode(doc['completion'])
    n_prompt, ids = len(prompt), np.concatenate([prompt, ids]).astype(np.int32)
    if tok.bos_id is not None:
      inputs = np.concatenate([np.int32([tok.bos_id]), ids])
      targets = np.concatenate([ids, np.int32([tok.eos_id])])
      weights = (np.arange(len(targets)) >= n_prompt).astype(np.float32)
    else:
      inputs, targets = ids[:-1], ids[1:]
      weights = (np.arange(len(targets)) + 1 >= n_prompt).astype(np.float32)
    return {'inputs': inputs, 'targets': targets, 'weights': weights}

  @staticmethod
  def n_bytes(doc) -> int:
    """UTF-8 bytes of the text the weighted targets spell: bits per byte count the completion of a pair."""
    if isinstance(doc, dict) and 'messages' in doc:
      return sum(len(m['content'].encode('utf-8')) for m in doc['messages'] if m['role'] == 'assistant')
    return len((doc if isinstance(doc, str) else doc['completion']).encode('utf-8'))

  @staticmethod
  def text(doc) -> str:
    """A document's whole text, to train a tokenizer on."""
    if isinstance(doc, dict) and 'messages' in doc:
      return '\n'.join(m['content'] for m in doc['messages'])
    return doc if isinstance(doc, str) else doc['prompt'] + doc['completion']


def encoder(config, tokenizer) -> DocumentEncoder:
  """The encoder of this config's documents: with data.dataset='chat', conversations through the chat template
  (data.chat_template or the tokenizer's own, which the tokenizer then carries into the workdir)."""
  if config.data.dataset != config_lib.CHAT:
    return DocumentEncoder(tokenizer)
  from lmjax import chat  # pylint: disable=import-outside-toplevel

  if not isinstance(tokenizer, tokenizers.HFTokenizer):
    raise tokenizers.TokenizerError(
      "data.dataset='chat' renders conversations with a Hugging Face tokenizer's chat template: fine-tune an HF "
      'model (train.init_from=hf:DIR or an import-hf workdir), or set data.tokenizer=hf'
    )
  tokenizer.chat_template = chat.resolve(config.data.get('chat_template', ''), tokenizer)
  return DocumentEncoder(tokenizer, chat.Template(tokenizer.chat_template, tokenizer))


def packed_rows(docs, encode, L: int, seed: int, pi: int, pc: int, *, epochs=None, read_threads: int = 2):
  """IterDataset of this process's packed rows (dicts of L-long arrays), epochs reshuffled (None = forever).

  Documents are sharded before they are read or tokenized: process pi touches only its own documents."""
  ds = grain.MapDataset.source(docs).shuffle(seed=seed).repeat(epochs)  # every epoch a fresh permutation
  ds = ds[pi::pc].map(encode).filter(lambda d: len(d['inputs']) > 0)
  # Threads tokenize ahead of the consumer; the iterator's state still counts documents, so resume is exact.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=256))
  it = grain_exp.ConcatThenSplitIterDataset(it, length_struct={'inputs': L, 'targets': L, 'weights': L})
  return it.map(_packed_batch_keys)


def _packed_batch_keys(row: dict) -> dict:
  seg = row['inputs_segment_ids']
  return {
    'inputs': row['inputs'],
    'targets': row['targets'],
    'segment_ids': seg,
    'positions': row['inputs_positions'],
    'weights': row['weights'] * (seg > 0),
  }


def packed_eval_rows(docs, encode, L: int, max_rows: int = 0) -> tuple[dict, int]:
  """The eval split's documents in order, packed like training rows (never shuffled): (rows, bytes), where
  rows are N x L arrays and bytes counts the UTF-8 bytes of the documents whose targets all carry weight 1.
  With max_rows, a document cut off at the last row gets weight 0, so loss and bytes cover the same text."""
  pieces, n_tokens = [], 0
  for i in range(len(docs)):
    d = encode(docs[i])
    if len(d['inputs']):
      pieces.append((d, encode.n_bytes(docs[i])))
      n_tokens += len(d['inputs'])
    if max_rows and n_tokens >= max_rows * L:
      break
  if not pieces:
    raise sources.DataError('the eval split holds no document with a target token')
  n_rows = math.ceil(n_tokens / L) if not max_rows else min(math.ceil(n_tokens / L), max_rows)
  size = n_rows * L
  flat = {k: np.zeros(max(size, n_tokens), np.int32) for k in ('inputs', 'targets', 'doc')}
  weights = np.zeros(max(size, n_tokens), np.float32)
  flat['doc'][:] = -1
  start, n_bytes = 0, 0
  for k, (d, b) in enumerate(pieces):
    end = start + len(d['inputs'])
    flat['inputs'][start:end], flat['targets'][start:end], flat['doc'][start:end] = d['inputs'], d['targets'], k
    if end <= size:  # wholly inside the evaluated rows
      weights[start:end], n_bytes = d['weights'], n_bytes + b
    start = end
  inputs_NxL, targets_NxL, doc_NxL = (flat[k][:size].reshape(n_rows, L) for k in ('inputs', 'targets', 'doc'))
  col_NxL = np.broadcast_to(np.arange(L), (n_rows, L))
  # A segment starts at column 0 and wherever the document changes; positions count from each start.
  starts_NxL = np.concatenate([np.ones((n_rows, 1), bool), doc_NxL[:, 1:] != doc_NxL[:, :-1]], axis=1)
  seg_NxL = np.where(doc_NxL >= 0, np.cumsum(starts_NxL, axis=1), 0).astype(np.int32)
  pos_NxL = (col_NxL - np.maximum.accumulate(np.where(starts_NxL, col_NxL, 0), axis=1)).astype(np.int32)
  rows = {
    'inputs': inputs_NxL,
    'targets': targets_NxL,
    'segment_ids': seg_NxL,
    'positions': pos_NxL,
    'weights': weights[:size].reshape(n_rows, L),
  }
  return rows, n_bytes


def packed_eval_batches(docs, encode, L, global_batch, max_batches, pi, pc) -> tuple[list, int, float]:
  """(this process's eval batches, UTF-8 bytes, weighted targets) of documents packed as eval rows."""
  rows, n_bytes = packed_eval_rows(docs, encode, L, max_batches * global_batch if max_batches else 0)
  n_targets = float(rows['weights'].sum())
  if not n_targets:
    raise sources.DataError(
      f'train.eval_max_batches = {max_batches} rows hold no whole eval document; raise it '
      '(or set it to 0 for the whole split)'
    )
  return _eval_batches(rows, global_batch, max_batches, pi, pc), n_bytes, n_targets


def eval_split(config, tokenizer) -> tuple[list, float, dict]:
  """eval_set of the run's eval split alone (`lmjax eval`), and a mixture's sources' as Data.source_evals holds
  them: no train split is read or tokenized."""
  tokenizers.check_config(tokenizer, config.data)
  if config.data.sources:
    return mixture_evals(config, tokenizer, mixture.sources(config))
  return *eval_set(config, tokenizer, sources.documents(config.data, config.data.eval_split)), {}


def eval_set(config, tokenizer, docs, process_index=None, process_count=None, max_batches=None) -> tuple[list, float]:
  """(this process's eval batches, UTF-8 bytes per weighted target) of any documents, cut as the run's eval split
  is (data.rows, train.eval_batch_size, train.eval_max_batches unless `max_batches`): a named perplexity set
  (lmjax/evals) of the same split reproduces the run's val_loss."""
  batches, n_bytes, n_targets = eval_counts(config, tokenizer, docs, process_index, process_count, max_batches)
  return batches, n_bytes / n_targets


def eval_counts(config, tokenizer, docs, process_index=None, process_count=None, max_batches=None):
  """eval_set's batches, with the UTF-8 bytes and the targets its bytes per token divide (windows: the tokens of
  the split): the counts a mixture pools over its sources."""
  tc, L = config.train, config.model.max_len
  max_batches = tc.eval_max_batches if max_batches is None else max_batches
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if config.data.rows == 'windows':
    text = _join(docs)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
      raise sources.DataError('the eval set holds fewer than two tokens: nothing to predict')
    batches = eval_rows_batches(ids, L, tc.eval_batch_size, max_batches, pi, pc)
    return batches, len(text.encode('utf-8')), len(ids)
  return packed_eval_batches(docs, encoder(config, tokenizer), L, tc.eval_batch_size, max_batches, pi, pc)
