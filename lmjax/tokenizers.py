"""Tokenizers: char, byte (and SentencePiece, see issue #3), one interface, saved in the workdir.

Special ids are defined here and nowhere else:
  char -- the sorted characters of the training text, nothing else (as nanoGPT): no BOS/EOS/pad.
  byte -- ids 0..255 are UTF-8 bytes, then PAD=256, BOS=257, EOS=258: any text round-trips.
Every tokenizer describes itself as a JSON dict (`spec`); the workdir and each checkpoint record it, and resuming
or sampling with a tokenizer whose spec differs is an error.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


class TokenizerError(ValueError):
  """Text or ids the tokenizer cannot handle, or a tokenizer that differs from the recorded one."""


class CharTokenizer:
  pad_id = bos_id = eos_id = None

  def __init__(self, chars: str):
    self.chars = chars
    self.vocab_size = len(chars)
    # A dense lookup table over code points makes encoding a 1 MB text a numpy gather, not a Python loop.
    codes = np.array([ord(c) for c in chars], np.int64)
    self._table = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, np.int32)
    self._table[codes] = np.arange(len(chars), dtype=np.int32)
    self._chars = np.array(list(chars)) if chars else np.array([], dtype='<U1')

  @classmethod
  def train(cls, text: str) -> 'CharTokenizer':
    return cls(''.join(sorted(set(text))))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32).astype(np.int64)
    ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
    if (ids < 0).any():
      bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
      raise TokenizerError(f'characters {bad!r} are not in the {self.vocab_size}-symbol char vocabulary of this run '
                           f'(it holds {self.chars!r}); remove them or train with tokenizer=byte')
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise TokenizerError(f'ids {sorted(set(bad.tolist()))[:10]} are outside the char vocabulary (0..{self.vocab_size - 1})')
    return ''.join(self._chars[ids].tolist())

  def spec(self) -> dict:
    return {'kind': 'char', 'vocab_size': self.vocab_size, 'chars': self.chars}


class ByteTokenizer:
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise TokenizerError(f'ids {sorted(set(bad.tolist()))[:10]} are outside the byte vocabulary (0..{self.vocab_size - 1})')
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode('utf-8', errors='replace')

  def spec(self) -> dict:
    return {'kind': 'byte', 'vocab_size': self.vocab_size}


KINDS = ('char', 'byte')
_FILE = 'tokenizer.json'


def build(kind: str, train_text: Optional[str]):
  if kind == 'char':
    return CharTokenizer.train(train_text)
  if kind == 'byte':
    return ByteTokenizer()
  raise TokenizerError(f'unknown tokenizer {kind!r}; choose one of {KINDS} with --config.data.tokenizer=...')


def from_spec(spec: dict):
  if spec['kind'] == 'char':
    return CharTokenizer(spec['chars'])
  if spec['kind'] == 'byte':
    return ByteTokenizer()
  raise TokenizerError(f'tokenizer spec of unknown kind {spec["kind"]!r}')


def save(tok, workdir: str) -> None:
  path = os.path.join(workdir, _FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(tok.spec(), f)
  os.replace(path + '.tmp', path)


def load(workdir: str):
  """The tokenizer a workdir recorded, or None if it has none yet."""
  path = os.path.join(workdir, _FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return from_spec(json.load(f))


def check_same(recorded: dict, current: dict, where: str) -> None:
  if recorded != current:
    diff = {k: (recorded.get(k), current.get(k)) for k in set(recorded) | set(current) if recorded.get(k) != current.get(k)}
    short = {k: tuple(str(x)[:60] for x in v) for k, v in diff.items()}
    raise TokenizerError(f'the tokenizer differs from the one recorded in {where}: (recorded, now) = {short}. '
                         'Use a fresh --workdir for a new tokenizer, or the settings this run was started with.')
