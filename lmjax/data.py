"""Data: TFDS text -> tokens -> seeded, checkpointable Grain batches; fixed eval batches.

Continuous text (tiny_shakespeare: one document per split) is cut into training rows as nanoGPT does: a row is
any window of max_len + 1 tokens (inputs are its first max_len, targets its last max_len). The windows are
shuffled with the run's seed by Grain, so the iterator's state is one integer and a resumed run sees exactly the
batches it would have seen. Each process reads only its slice of every global batch.

Batches are dicts of numpy arrays, local to this process:
  inputs_BxL, targets_BxL (int32); weights_BxL (float32, eval only: 0 marks padding rows).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import grain
import jax
import numpy as np

from lmjax import sources, tokenizers


@dataclasses.dataclass
class Data:
  tokenizer: object
  train_iter: Iterator[dict]  # a grain DatasetIterator: get_state()/set_state() make it resumable
  eval_batches: list  # fixed list of local eval batches (whole eval split, padded rows weighted 0)
  eval_bytes_per_token: float  # UTF-8 bytes of the eval text per eval token: turns nats/token into bits/byte


def load_texts(dc) -> tuple[str, str]:
  """(train text, eval text) from the TFDS dataset the config names; documents of a split are concatenated."""
  data_dir = dc.data_dir or None
  manual = dc.manual_dir or None
  if dc.dataset == sources.TINY_SHAKESPEARE:
    sources.prepare_tiny_shakespeare(data_dir or _default_data_dir(), manual)
  out = []
  for split in (dc.train_split, dc.eval_split):
    src = sources.text_source(dc.dataset, split, data_dir or _default_data_dir(), manual)
    out.append(''.join(sources.feature_text(src[i], dc.feature, dc.dataset) for i in range(len(src))))
  return out[0], out[1]


def _default_data_dir() -> str:
  return os.path.expanduser('~/tensorflow_datasets')


def make_data(config, tokenizer=None, *, workdir=None, process_index=None, process_count=None) -> Data:
  """Builds tokenizer (unless given: a resumed run passes the recorded one), train iterator and eval batches.

  workdir: where a tokenizer that must be trained (SentencePiece) caches its model."""
  dc, tc = config.data, config.train
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  train_text, eval_text = load_texts(dc)
  if tokenizer is None:
    tokenizer = tokenizers.build(dc.tokenizer, train_text)
  train_ids = tokenizer.encode(train_text)
  eval_ids = tokenizer.encode(eval_text)
  L = config.model.max_len
  if len(train_ids) < L + 1:
    raise sources.DataError(f'the train split has {len(train_ids)} tokens, fewer than one row of max_len + 1 = {L + 1}')
  return Data(tokenizer, train_iterator(train_ids, L, tc.batch_size, config.seed, dc.window_stride, tc.steps, pi, pc),
              eval_rows_batches(eval_ids, L, tc.eval_batch_size, tc.eval_max_batches, pi, pc),
              eval_bytes_per_token=len(eval_text.encode('utf-8')) / max(len(eval_ids), 1))


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'train.batch_size ({global_batch}) must be divisible by the number of processes ({process_count})')
  return global_batch // process_count


def train_iterator(ids: np.ndarray, L: int, global_batch: int, seed: int, stride: int, steps: int, pi: int, pc: int):
  """Seeded shuffled windows, batched; this process's rows of each global batch. Infinite in practice."""
  n_windows = (len(ids) - L - 1) // stride + 1
  # Enough epochs for the whole run and then some; Grain shuffles all of them as one index permutation (epochs
  # mix, like nanoGPT's sampling with replacement), which costs nothing: indices are permuted lazily.
  epochs = math.ceil((steps + 1000) * global_batch / n_windows) + 1
  local = _local_batch(global_batch, pc)

  def window(i):
    start = int(i) * stride
    row = ids[start:start + L + 1]
    return {'inputs': row[:-1], 'targets': row[1:]}

  ds = grain.MapDataset.range(n_windows).repeat(epochs).shuffle(seed=seed)
  ds = ds[pi::pc].map(window).batch(local, drop_remainder=True)
  return iter(ds)


def _eval_rows(ids: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping rows covering every token of the split once as a target (last row zero-padded)."""
  n_rows = math.ceil((len(ids) - 1) / L)
  padded = np.zeros(n_rows * L + 1, np.int32)
  padded[:len(ids)] = ids
  w = np.zeros(n_rows * L, np.float32)
  w[:len(ids) - 1] = 1.0
  idx = np.arange(n_rows)[:, None] * L + np.arange(L)[None, :]
  return np.stack([padded[idx], padded[idx + 1]]), w[idx]


def eval_rows_batches(ids: np.ndarray, L: int, global_batch: int, max_batches: int, pi: int, pc: int) -> list:
  (inputs, targets), weights = _eval_rows(ids, L)
  n_batches = math.ceil(len(inputs) / global_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  pad = n_batches * global_batch - len(inputs)
  if pad > 0:
    inputs, targets = (np.concatenate([a, np.zeros((pad, L), np.int32)]) for a in (inputs, targets))
    weights = np.concatenate([weights, np.zeros((pad, L), np.float32)])
  local = _local_batch(global_batch, pc)
  out = []
  for b in range(n_batches):
    rows = slice(b * global_batch + pi * local, b * global_batch + (pi + 1) * local)
    out.append({'inputs': inputs[rows], 'targets': targets[rows], 'weights': weights[rows]})
  return out
