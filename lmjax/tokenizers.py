"""Tokenizers: char, byte, SentencePiece and Hugging Face tokenizer.json, one interface, recorded in the workdir.

Special ids are defined here and nowhere else:
  char -- the sorted characters of the training text, nothing else (as nanoGPT): no BOS/EOS/pad.
  byte -- ids 0..255 are UTF-8 bytes, then PAD=256, BOS=257, EOS=258: any text round-trips.
  spm  -- SentencePiece (BPE or unigram) with PAD=0, UNK=1, BOS=2, EOS=3, then '\n' as one piece, then the 256
          byte pieces (byte_fallback: a character never seen in training becomes its UTF-8 bytes, so no text is
          ever lost) and the learned pieces. Normalisation is off (identity, no dummy prefix, spaces kept), so
          decode(encode(text)) == text for any text and bits per byte count the bytes of the text as written.
  hf   -- a Hugging Face `tokenizer.json` (the `tokenizers` library; GPT-2's and Llama's byte-level BPE among
          others) with its own special ids, read from the files beside it (config.json, tokenizer_config.json).
          Text is encoded without specials (byte-level BPE round-trips exactly); `adds_bos` says whether the
          tokenizer's own post-processor starts a sequence with BOS (Llama's does), which prompts then follow.
          A tokenizer with only one of BOS and EOS uses it for both (GPT-2's <|endoftext|>).
How the data uses them (lmjax/data.py): continuous text (rows = 'windows') is encoded as is, with no specials;
a packed document becomes inputs [BOS] + ids and targets ids + [EOS], so the model learns where documents start
and end; PAD (or 0 for char) fills only rows that have no more text, with weight 0.

Every tokenizer describes itself as a JSON dict (`spec`); the workdir (tokenizer.json, plus tokenizer.model for
spm) and each checkpoint record it, and resuming or sampling with a tokenizer whose spec differs is an error. An
spm spec holds the sha256 of its model proto, so two models with the same settings but different pieces differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from etils import epath
from lmjax import config as config_lib, files
from lmjax.errors import TokenizerError


def _check_ids(ids: Sequence[int], vocab_size: int, kind: str) -> np.ndarray:
  ids = np.asarray(ids, np.int64)
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise TokenizerError(
      f'ids {sorted(set(bad.tolist()))[:10]} are outside the {kind} vocabulary (0..{vocab_size - 1})'
    )
  return ids


class CharTokenizer:
  pad_id = bos_id = eos_id = None
  adds_bos = False  # prompts are encoded as they are (HFTokenizer may start them with BOS)

  def __init__(self, chars: str):
    self.chars = chars
    self.vocab_size = len(chars)
    # A dense lookup table over code points makes encoding a 1 MB text a numpy gather, not a Python loop.
    codes = np.array([ord(c) for c in chars], np.int64)
    self._table = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, np.int32)
    self._table[codes] = np.arange(len(chars), dtype=np.int32)
    self._chars = np.array(list(chars)) if chars else np.array([], dtype='<U1')

  @classmethod
  def train(cls, texts: Iterable[str]) -> 'CharTokenizer':
    chars = set()
    for t in texts:
      chars.update(t)
    return cls(''.join(sorted(chars)))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32).astype(np.int64)
    ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
    if (ids < 0).any():
      bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
      raise TokenizerError(
        f'characters {bad!r} are not in the {self.vocab_size}-symbol char vocabulary of this run '
        f'(it holds {self.chars!r}); remove them or train with tokenizer=byte or spm'
      )
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return ''.join(self._chars[_check_ids(ids, self.vocab_size, 'char')].tolist())

  def spec(self) -> dict:
    return {'kind': 'char', 'vocab_size': self.vocab_size, 'chars': self.chars}


class ByteTokenizer:
  pad_id, bos_id, eos_id = 256, 257, 258
  adds_bos = False
  vocab_size = 259

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, 'byte')
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode('utf-8', errors='replace')

  def spec(self) -> dict:
    return {'kind': 'byte', 'vocab_size': self.vocab_size}


class SentencePieceTokenizer:
  pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
  adds_bos = False
  MODEL_FILE = 'tokenizer.model'  # the proto's name inside a workdir, next to tokenizer.json

  def __init__(self, proto: bytes):
    import sentencepiece as spm

    self.proto = proto
    self.sha256 = hashlib.sha256(proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self._sp.get_piece_size()
    got = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
    if got != (self.pad_id, self.bos_id, self.eos_id):
      raise TokenizerError(
        f'the SentencePiece model has pad/bos/eos ids {got}, but lmjax needs (0, 2, 3) (train it '
        'with pad_id=0 unk_id=1 bos_id=2 eos_id=3, or leave data.spm_model empty to train one)'
      )
    self.model_type = ('unigram', 'bpe', 'word', 'char')[self._trainer_spec().model_type - 1]

  def _trainer_spec(self):
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(self.proto)
    return m.trainer_spec

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(_check_ids(ids, self.vocab_size, 'SentencePiece').tolist())

  def spec(self) -> dict:
    return {
      'kind': 'spm',
      'vocab_size': self.vocab_size,
      'model_type': self.model_type,
      'sha256': self.sha256,
      'model_file': self.MODEL_FILE,
    }


class HFTokenizer:
  """A Hugging Face tokenizer.json through the `tokenizers` library, with the special ids of its model."""

  MODEL_FILE = 'hf_tokenizer.json'  # inside a workdir, next to lmjax's own tokenizer.json (the spec)

  def __init__(self, raw: bytes, bos_id=None, eos_id=None, pad_id=None, adds_bos=None, *, specials_from=None):
    """`specials_from`: a model directory whose files name the special ids (hf_special_ids), instead of the ids."""
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    self.raw = raw
    self.sha256 = hashlib.sha256(raw).hexdigest()
    try:
      self._tok = Tokenizer.from_str(raw.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except  -- the library raises a bare Exception for bad JSON
      raise TokenizerError(f'the tokenizer.json cannot be read by the tokenizers library: {e}') from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if specials_from is not None:
      ids = hf_special_ids(specials_from, self._tok)
      bos_id, eos_id, pad_id = ids['bos'], ids['eos'], ids['pad']
    bos_id = eos_id if bos_id is None else bos_id
    eos_id = bos_id if eos_id is None else eos_id
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    if adds_bos is None:  # does the tokenizer's own post-processor start a sequence with BOS?
      with_specials = self._tok.encode('a', add_special_tokens=True).ids
      adds_bos = bos_id is not None and bool(with_specials) and with_specials[0] == bos_id
    self.adds_bos = bool(adds_bos)
    # The Jinja chat template of the model's tokenizer_config.json (lmjax/chat.py), None without one. Not part of
    # the spec: a run may give its own (data.chat_template); the workdir keeps the one it used beside the spec.
    self.chat_template = None

  @classmethod
  def from_path(cls, path: str) -> 'HFTokenizer':
    """A tokenizer.json (or a directory holding one), with the special ids named by the files beside it."""
    directory = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise TokenizerError(
        f'{file} does not exist; point at a Hugging Face tokenizer.json (save one with '
        "transformers.AutoTokenizer.from_pretrained(...).save_pretrained(DIR), which writes the fast tokenizer's "
        'tokenizer.json)'
      )
    with open(file, 'rb') as f:
      raw = f.read()
    from lmjax import chat  # pylint: disable=import-outside-toplevel

    tok = cls(raw, specials_from=directory)
    tok.chat_template = chat.template_of(directory)
    return tok

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(_check_ids(ids, self.vocab_size, 'tokenizer.json').tolist(), skip_special_tokens=True)

  def spec(self) -> dict:
    return {
      'kind': 'hf',
      'vocab_size': self.vocab_size,
      'sha256': self.sha256,
      'model_file': self.MODEL_FILE,
      'bos_id': self.bos_id,
      'eos_id': self.eos_id,
      'pad_id': self.pad_id,
      'adds_bos': self.adds_bos,
    }


def hf_special_ids(directory: str, tok) -> dict:
  """{'bos', 'eos', 'pad'} ids (None where absent) from a Hugging Face model directory: config.json's and
  generation_config.json's *_token_id, else tokenizer_config.json's or special_tokens_map.json's token strings.
  A BOS or EOS the files name but the vocabulary lacks is a TokenizerError (training needs the very token the
  model was given); such a PAD is a warning, since lmjax pads with its own ids."""

  def read(name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      return {}
    try:
      with open(path, 'rb') as f:
        settings = json.loads(f.read().decode('utf-8'))
    except (OSError, ValueError, RecursionError) as e:
      raise TokenizerError(f'{path} cannot be read as JSON ({" ".join(str(e).split())[:120]}); save it again') from None
    if not isinstance(settings, dict):
      raise TokenizerError(f'{path} holds a JSON {type(settings).__name__}, not an object; save it again')
    return settings

  def first_id(value):  # eos_token_id may be a list (Llama 3 instruct); the first is the document end
    value = value[0] if isinstance(value, list) and value else value
    return value if isinstance(value, int) and not isinstance(value, bool) else None

  files = {name: read(name) for name in ('config.json', 'generation_config.json')}
  strings = {
    **{k: ('special_tokens_map.json', v) for k, v in read('special_tokens_map.json').items()},
    **{k: ('tokenizer_config.json', v) for k, v in read('tokenizer_config.json').items()},
  }
  vocab = tok.get_vocab_size(with_added_tokens=True)
  out = {}
  for name in ('bos', 'eos', 'pad'):
    found = None
    for file, settings in files.items():
      found = first_id(settings.get(f'{name}_token_id'))
      if found is not None:
        if not 0 <= found < vocab:
          _missing_special(name, f'{file} gives {name}_token_id={found}', vocab)
        break
    file, token = strings.get(f'{name}_token', (None, None))
    token = token.get('content') if isinstance(token, dict) else token
    if found is None and isinstance(token, str):
      found = tok.token_to_id(token)
      if found is None:
        _missing_special(name, f'{file} names {name}_token {token!r}', vocab)
    out[name] = found if found is not None and 0 <= found < vocab else None
  return out


def _missing_special(name: str, named: str, vocab: int) -> None:
  problem = f"{named}, which is not in tokenizer.json's vocabulary of {vocab} tokens"
  if name == 'pad':
    print(f'lmjax: warning: {problem}; the model gets no pad id (lmjax pads on its own)', file=sys.stderr)
    return
  role = {'bos': 'begin', 'eos': 'end'}[name]
  raise TokenizerError(
    f'{problem}: without it no document would {role} with the token the model knows (a fine-tune on pairs '
    f'{"would never learn to stop" if name == "eos" else "would start differently"}). Add the token to '
    'tokenizer.json (tokenizer.add_special_tokens, then save_pretrained) or name one it holds'
  )


KINDS = config_lib.TOKENIZERS
_FILE = 'tokenizer.json'
CHAT_TEMPLATE = 'chat_template.jinja'  # an 'hf' tokenizer's chat template, beside its files in a workdir


def build(dc, texts: Callable[[], Iterable[str]], cache_dir: Optional[str] = None, *, process_index=0, process_count=1):
  """The tokenizer the data config `dc` asks for. `texts()` yields training text (called only if one must be
  trained); a trained SentencePiece model is cached in dc.tokenizer_dir, else cache_dir (the workdir). In a job of
  several processes sharing that directory, process 0 trains and writes it and the others wait and read it."""
  if dc.tokenizer == 'char':
    return CharTokenizer.train(texts())
  if dc.tokenizer == 'byte':
    return ByteTokenizer()
  if dc.tokenizer == 'spm':
    if dc.spm_model:
      path = epath.Path(dc.spm_model)
      if not path.exists():
        raise TokenizerError(
          f'data.spm_model = {dc.spm_model!r} does not exist; give an existing .model file, or '
          'leave it empty to train one from the dataset'
        )
      return check_config(SentencePieceTokenizer(path.read_bytes()), dc, str(path))
    return _trained_spm(dc, texts, cache_dir, process_index, process_count)
  if dc.tokenizer == 'hf':
    if not dc.hf_tokenizer:
      raise TokenizerError(
        "data.tokenizer='hf' needs data.hf_tokenizer: a tokenizer.json or the directory of a saved Hugging Face "
        'model (or start from one with train.init_from, which brings its tokenizer)'
      )
    return HFTokenizer.from_path(dc.hf_tokenizer)
  raise TokenizerError(f'unknown tokenizer {dc.tokenizer!r}; choose one of {KINDS} with --config.data.tokenizer=...')


SPM_WAIT_S = 4 * 3600  # how long other processes wait for process 0 to train a SentencePiece model


def _trained_spm(dc, texts, cache_dir, process_index=0, process_count=1):
  settings = {
    k: dc[k] for k in ('dataset', 'train_split', 'feature', 'spm_vocab_size', 'spm_model_type', 'spm_train_chars')
  }
  if dc.get('sources'):  # a mixture's model is trained on all its sources (whatever their weights)
    settings['sources'] = [{k: v for k, v in s.items() if k != 'weight'} for s in dc.sources]
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  directory = dc.tokenizer_dir or cache_dir
  path = epath.Path(directory) / f'spm-{dc.spm_model_type}{dc.spm_vocab_size}-{key}.model' if directory else None
  if path is not None and path.exists():
    return SentencePieceTokenizer(path.read_bytes())
  if path is not None and process_count > 1 and process_index != 0:
    return SentencePieceTokenizer(_wait_for(path))
  tok = SentencePieceTokenizer(train_spm(texts(), dc.spm_vocab_size, dc.spm_model_type, dc.spm_train_chars))
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, tok.proto)
  return tok


def _wait_for(path, timeout_s: float | None = None, poll_s: float = 1.0) -> bytes:
  """The bytes of `path` once process 0 has written it (whole: it is renamed into place)."""
  deadline = time.monotonic() + (SPM_WAIT_S if timeout_s is None else timeout_s)
  while not path.exists():
    if time.monotonic() > deadline:
      raise TokenizerError(
        f"waited for process 0 to train {path} and it did not appear; check process 0's log, or train the "
        'tokenizer once on one host (data.tokenizer_dir) before the multi-host run'
      )
    time.sleep(poll_s)
  return path.read_bytes()


def train_spm(texts: Iterable[str], vocab_size: int, model_type: str, max_chars: int) -> bytes:
  """A serialized SentencePiece model trained on the lines of `texts` (at most max_chars characters)."""
  import sentencepiece as spm

  if model_type not in ('bpe', 'unigram'):
    raise TokenizerError(f"data.spm_model_type must be 'bpe' or 'unigram', got {model_type!r}")

  def lines():  # SentencePiece trains on sentences: lines, without their newline (it is a piece of its own)
    n = 0
    for text in texts:
      for line in text.split('\n'):
        if line:
          yield line
          n += len(line)
          if n >= max_chars:
            return

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=lines(),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,
      character_coverage=1.0,
      normalization_rule_name='identity',
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_digits=True,
      user_defined_symbols=['\n'],
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      input_sentence_size=0,
      max_sentence_length=1 << 16,
      num_threads=2,
      minloglevel=2,
    )
  except RuntimeError as e:
    most = re.search(r'value <= (\d+)', str(e))
    if most:
      raise TokenizerError(
        f'data.spm_vocab_size = {vocab_size} is more {model_type} pieces than the training text supports (at most '
        f'{most.group(1)}, including the 256 byte pieces and 4 specials). Lower --config.data.spm_vocab_size to '
        f'<= {most.group(1)}, or train on more text (data.spm_train_chars, a larger split).'
      ) from None
    least = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
    if least:
      raise TokenizerError(
        f'data.spm_vocab_size = {vocab_size} cannot hold the specials, the 256 byte pieces and every character of '
        f'the training text; raise --config.data.spm_vocab_size to >= {least.group(1)}.'
      ) from None
    raise TokenizerError(f'SentencePiece training failed: {e}') from e
  return model.getvalue()


def check_config(tok, dc, where: str = 'the workdir'):
  """Raises TokenizerError when a recorded or given tokenizer does not match what the data config asks for."""
  kind = tok.spec()['kind']
  if kind != dc.tokenizer:
    raise TokenizerError(
      f'the tokenizer in {where} is {kind!r} but the config asks for {dc.tokenizer!r}; use a new '
      '--workdir, or set --config.data.tokenizer to match'
    )
  if kind == 'spm' and not dc.spm_model and (tok.vocab_size, tok.model_type) != (dc.spm_vocab_size, dc.spm_model_type):
    raise TokenizerError(
      f'the SentencePiece model in {where} is {tok.model_type} with {tok.vocab_size} pieces but the '
      f'config asks for {dc.spm_model_type} with {dc.spm_vocab_size}; use a new --workdir, or '
      'the settings this run was started with'
    )
  return tok


def from_spec(spec: dict, directory: Optional[str] = None):
  """The tokenizer a spec describes; spm reads its model from `directory` and checks the proto's sha256."""
  if spec['kind'] == 'char':
    return CharTokenizer(spec['chars'])
  if spec['kind'] == 'byte':
    return ByteTokenizer()
  if spec['kind'] == 'spm':
    path = epath.Path(directory or '.') / spec['model_file']
    if not path.exists():
      raise TokenizerError(
        f'{path} is missing: the SentencePiece model this run was trained with (sha256 '
        f'{spec["sha256"]}) must sit next to {_FILE}'
      )
    tok = SentencePieceTokenizer(path.read_bytes())
    check_same(spec, tok.spec(), str(path))
    return tok
  if spec['kind'] == 'hf':
    path = epath.Path(directory or '.') / spec['model_file']
    if not path.exists():
      raise TokenizerError(f'{path} is missing: the tokenizer.json this run uses must sit next to {_FILE}')
    tok = HFTokenizer(path.read_bytes(), spec['bos_id'], spec['eos_id'], spec['pad_id'], spec['adds_bos'])
    check_same(spec, tok.spec(), str(path))
    template = epath.Path(directory or '.') / CHAT_TEMPLATE
    tok.chat_template = template.read_text(encoding='utf-8') if template.exists() else None
    return tok
  raise TokenizerError(f'tokenizer spec of unknown kind {spec["kind"]!r}')


def save(tok, workdir: str) -> None:
  """tokenizer.json (the spec) and, for spm, tokenizer.model: a new process reloads it from the workdir alone."""
  directory = epath.Path(workdir)
  if isinstance(tok, SentencePieceTokenizer):
    files.write_atomic(directory / tok.MODEL_FILE, tok.proto)
  if isinstance(tok, HFTokenizer):
    files.write_atomic(directory / tok.MODEL_FILE, tok.raw)
    if tok.chat_template:
      files.write_atomic(directory / CHAT_TEMPLATE, tok.chat_template.encode('utf-8'))
  files.write_atomic(directory / _FILE, json.dumps(tok.spec()).encode())


def load(workdir: str):
  """The tokenizer a workdir recorded, or None if it has none yet."""
  path = epath.Path(workdir) / _FILE
  if not path.exists():
    return None
  return from_spec(json.loads(path.read_text()), workdir)


def check_same(recorded: dict, current: dict, where: str) -> None:
  if recorded != current:
    diff = {
      k: (recorded.get(k), current.get(k)) for k in set(recorded) | set(current) if recorded.get(k) != current.get(k)
    }
    short = {k: tuple(str(x)[:60] for x in v) for k, v in diff.items()}
    raise TokenizerError(
      f'the tokenizer differs from the one recorded in {where}: (recorded, now) = {short}. '
      'Use a fresh --workdir for a new tokenizer, or the settings this run was started with.'
    )
