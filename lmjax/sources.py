"""Text documents as random-access sources, without TF or network: TFDS datasets or local text files.

TFDS's stock builders read through `tf.io.gfile` and fetch their files from
the internet; here nothing is ever downloaded. tiny_shakespeare is built from a
local `input.txt` checked against the size/sha256 TFDS registers for it; any
other dataset (lm1b, c4/en, ...) must already be prepared (array_record) in
`data_dir`, which may be a gs:// path (all paths go through etils.epath).
`dataset = 'text_files'` reads files matched by a glob (the split names the
glob): one document per file, or one per line. `dataset = 'parquet'` / `'arrow'` reads the text column
`feature` of local Parquet or Arrow files (what Hugging Face `datasets` writes with to_parquet / save_to_disk),
one document per row.

`documents(dc, split)` is what lmjax/data.py reads: len() documents, [i] -> str.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import os

import numpy as np
from etils import epath

import tensorflow_datasets as tfds
from tensorflow_datasets.core.file_adapters import FileFormat
from lmjax import config as config_lib
from lmjax.errors import DataError, one_line

TINY_SHAKESPEARE = 'tiny_shakespeare'
TEXT_FILES = 'text_files'
JSONL = config_lib.JSONL
TABLES = config_lib.TABLES
_TS_FILE = 'input.txt'
_FORMAT = 'array_record'
_StockTinyShakespeare = tfds.builder_cls(TINY_SHAKESPEARE)


def _registered_checksum() -> tuple[int, str]:
  """(size, sha256) TFDS registers for tiny_shakespeare's input.txt."""
  # Read from TFDS's checksums.tsv rather than hard-coding, so a TFDS upgrade
  # that changes the expected file is noticed instead of silently diverging.
  for info in (_StockTinyShakespeare.url_infos or {}).values():
    if info.filename == _TS_FILE:
      return int(info.size), info.checksum
  raise DataError(
    f'TFDS registers no checksum for {TINY_SHAKESPEARE}/{_TS_FILE} '
    f'(checksums at {_StockTinyShakespeare._checksums_path}); '
    'the installed tensorflow-datasets looks incompatible.'
  )


def _read_verified(manual_dir: str | None) -> bytes:
  """manual_dir/input.txt, after checking it against TFDS's registered checksum."""
  size, sha = _registered_checksum()
  path = epath.Path(manual_dir or '<manual_dir>') / _TS_FILE
  fix = (
    f'Put the tiny_shakespeare {_TS_FILE} ({size} bytes, sha256 {sha}) at '
    f'{path}, or pass --config.data.manual_dir=DIR naming the directory '
    f'that holds it. (Nothing is downloaded: it is karpathy/char-rnn '
    f'data/tinyshakespeare/{_TS_FILE}.)'
  )
  if manual_dir is None:
    raise DataError(f'tiny_shakespeare is not prepared and no manual_dir was given. {fix}')
  if not path.exists():
    raise DataError(f'{path} does not exist. {fix}')
  with path.open('rb') as f:
    actual_sha = hashlib.file_digest(f, 'sha256').hexdigest()
  actual_size = path.stat().length
  if actual_size != size or actual_sha != sha:
    raise DataError(
      f'{path} is {actual_size} bytes with sha256 {actual_sha}, but '
      f'expected {size} bytes with sha256 {sha} (corrupt or a different '
      f'file). {fix}'
    )
  return path.read_bytes()


class _LocalTinyShakespeare(_StockTinyShakespeare, skip_registration=True):
  """The stock builder (name, version, splits, features), reading a local file."""

  name = TINY_SHAKESPEARE
  # Point metadata (README, citation) and checksums.tsv at the stock package,
  # not at this module, so the prepared dataset_info matches the stock one.
  code_path = _StockTinyShakespeare.code_path
  pkg_dir_path = _StockTinyShakespeare._get_pkg_dir_path()

  _text = ''  # Set by prepare_tiny_shakespeare once input.txt is verified.

  def _split_generators(self, dl_manager):
    del dl_manager  # Never download: the text was read and verified upfront.
    text = self._text
    # Same 90/5/5 cut as the stock builder (its code can't run without TF).
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5)
    parts = {'train': train, 'validation': rest[:j], 'test': rest[j:]}
    return [
      tfds.core.SplitGenerator(name=key, gen_kwargs={'split_key': key, 'split_text': part})
      for key, part in parts.items()
    ]


def prepare_tiny_shakespeare(data_dir: str, manual_dir: str | None) -> None:
  """Builds stock `tiny_shakespeare` (array_record) in data_dir from manual_dir/input.txt."""
  builder = _LocalTinyShakespeare(data_dir=data_dir, file_format=_FORMAT)
  if builder.is_prepared():
    return
  # Verify before building so a bad file fails fast and leaves nothing behind.
  builder._text = _read_verified(manual_dir).decode('utf-8')
  builder.download_and_prepare(
    file_format=_FORMAT,
    # No GCS: there is no network, and a GCS probe could hang.
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )


def _prepared_builder(name: str, data_dir: str):
  """The builder for an already prepared array_record dataset, else DataError."""
  base = re.split(r'[/:]', name, maxsplit=1)[0]
  # No community datasets: listing them reads an index from GCS.
  known = sorted(set(tfds.list_builders(with_community_datasets=False)))
  if base not in known:
    close = difflib.get_close_matches(base, known, n=5)
    raise DataError(
      f'Unknown TFDS dataset {name!r}. Close matches: {close or "none"}. See tfds.list_builders() for all names.'
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Could not create TFDS builder {name!r}: {e}') from e
  if not builder.is_prepared():
    raise DataError(
      f'TFDS dataset {name!r} is not prepared in {data_dir} (looked for '
      f'{builder.data_path}) and is never downloaded here. On a machine with '
      f'network access run `tfds build {name} --data_dir=DIR '
      f'--file_format={_FORMAT}` (manual-download datasets take their files '
      f'from DIR/downloads/manual) and copy DIR/{base} into {data_dir}.'
    )
  if builder.info.file_format not in FileFormat.with_random_access():
    raise DataError(
      f'{name!r} in {builder.data_path} is {builder.info.file_format.value}, but '
      f'random access needs {_FORMAT}. Convert it with `tfds convert_format '
      f'--dataset_version_dir={builder.data_path} '
      f'--out_file_format={_FORMAT}`.'
    )
  return builder


def _check_split(builder, split: str) -> None:
  available = sorted(builder.info.splits.keys())
  # 'validation+test', 'train[:10%]': check each base split name.
  for part in split.split('+'):
    base = part.split('[', 1)[0].strip()
    if base not in available:
      raise DataError(f'{builder.name!r} has no split {base!r} (from {split!r}); available splits: {available}.')


def text_source(name: str, split: str, data_dir: str, manual_dir: str | None = None):
  """Random-access (len/getitem) source of `name`'s `split`, prepared in data_dir.

  Only tiny_shakespeare is prepared on demand (from manual_dir/input.txt);
  anything else must already be prepared. Never downloads.
  """
  if name == TINY_SHAKESPEARE:
    prepare_tiny_shakespeare(data_dir, manual_dir)
  _check_split(_prepared_builder(name, data_dir), split)
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)


def feature_text(example, feature: str, name: str) -> str:
  """The `feature` of one example as str, or DataError naming the features."""
  if feature not in example:
    raise DataError(
      f'{name!r} examples have no feature {feature!r}; available: '
      f'{sorted(example)}. Choose one of those as the text feature.'
    )
  value = example[feature]
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def tiny_shakespeare_text(data_dir: str, manual_dir: str | None, split: str) -> str:
  """The whole text of a tiny_shakespeare split (each split is one example)."""
  source = text_source(TINY_SHAKESPEARE, split, data_dir, manual_dir)
  return ''.join(feature_text(source[i], 'text', TINY_SHAKESPEARE) for i in range(len(source)))


# ---------------------------------------------------------------------------------------------- documents


def default_data_dir() -> str:
  return os.path.expanduser('~/tensorflow_datasets')


class TFDSDocuments:
  """A TFDS split as documents: [i] -> the `feature` text of example i."""

  def __init__(self, source, feature: str, name: str):
    self._source, self._feature, self._name = source, feature, name

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i) -> str:
    return feature_text(self._source[int(i)], self._feature, self._name)


class TextFiles:
  """Local (or gs://) text files matched by a glob, one document per file or per non-empty line.

  Per line, the files are scanned once for line offsets (numpy, no Python loop over lines); [i] then reads one
  line from its file. Files are UTF-8; an undecodable byte is an error naming the file."""

  def __init__(self, pattern: str, per: str = 'file'):
    if per not in ('file', 'line'):
      raise DataError(f"data.file_docs must be 'file' or 'line', got {per!r}")
    self.paths = glob(pattern)
    self.per = per
    if per == 'line':
      self._starts, self._ends, self._file = [], [], []
      for f, path in enumerate(self.paths):
        raw = np.frombuffer(path.read_bytes(), np.uint8)
        ends = np.append(np.flatnonzero(raw == ord('\n')), len(raw))
        starts = np.concatenate([[0], ends[:-1] + 1])
        keep = ends > starts  # empty lines are not documents
        self._starts.append(starts[keep])
        self._ends.append(ends[keep])
        self._file.append(np.full(keep.sum(), f, np.int32))
      self._starts, self._ends, self._file = (np.concatenate(a) for a in (self._starts, self._ends, self._file))
      self._cache = (None, b'')  # the last file read: lines are read in runs from the same file
    if len(self) == 0:
      raise DataError(f'the files matching {pattern!r} hold no text ({len(self.paths)} files, all empty)')

  def __len__(self):
    return len(self.paths) if self.per == 'file' else len(self._starts)

  def _bytes(self, f: int) -> bytes:
    if self._cache[0] != f:
      self._cache = (f, self.paths[f].read_bytes())
    return self._cache[1]

  def __getitem__(self, i) -> str:
    i = int(i)
    if self.per == 'file':
      path, raw = self.paths[i], self.paths[i].read_bytes()
    else:
      f = int(self._file[i])
      path, raw = self.paths[f], self._bytes(f)[self._starts[i] : self._ends[i]]
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise DataError(f'{path} is not UTF-8 text ({e}); convert it or leave it out of the glob') from None


class TableFiles:
  """The text column `field` of Parquet (.parquet) or Arrow (.arrow: IPC file or stream, as `datasets.save_to_disk`
  writes) files matched by a glob or held in a directory, one document per row. Only that column is read; Arrow
  files are memory-mapped, so [i] touches one row."""

  def __init__(self, pattern: str, field: str):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel  -- only table sources need it

    if os.path.isdir(pattern):  # a save_to_disk directory: its data files, not its JSON metadata
      pattern = os.path.join(pattern, '*')
    self.paths = [p for p in glob(pattern) if p.suffix in ('.parquet', '.arrow')]
    if not self.paths:
      raise DataError(f'no .parquet or .arrow file matches {pattern!r}; give a glob of Parquet or Arrow files')
    self._columns = []  # one per file, as stored (string or large_string): nothing copied
    for path in self.paths:
      table = self._read(pa, path)
      if field not in table.column_names:
        raise DataError(
          f'{path} has no column {field!r} (its columns: {", ".join(table.column_names)}); set the text column '
          "with --config.data.feature=NAME (or 'feature' in the source's entry of data.sources)"
        )
      column = table.column(field)
      if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f'{path}: column {field!r} holds {column.type}, not text; choose a string column')
      self._columns.append(column)
    self._starts = np.cumsum([0] + [len(c) for c in self._columns])
    if not len(self):
      raise DataError(f'the files matching {pattern!r} hold no rows')

  @staticmethod
  def _read(pa, path):
    if path.suffix == '.parquet':
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

      try:
        return pq.read_table(str(path))
      except (OSError, pa.ArrowException) as e:
        raise DataError(f'{path} is not a readable Parquet file ({one_line(e)})') from None
    source = pa.memory_map(str(path))
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
      try:
        return opener(source).read_all()
      except pa.ArrowInvalid:
        source.seek(0)
    raise DataError(f'{path} is not an Arrow IPC file or stream (as datasets.save_to_disk writes)')

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, i) -> str:
    i = int(i)
    f = int(np.searchsorted(self._starts, i, side='right')) - 1
    return self._columns[f][i - int(self._starts[f])].as_py() or ''


def jsonl_objects(path: str):
  """(line number, JSON object) of every non-blank line of a local JSONL file; DataError naming file:line for a
  line that is not UTF-8, not JSON, or not an object. The one reader of JSONL files (training pairs, eval tasks)."""
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist (or is not a file); give the path of a local .jsonl file')
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(f'{path}:{n}: not UTF-8 ({e.reason}); save the file as UTF-8') from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise DataError(f'{path}:{n}: not valid JSON ({e}); write one JSON object per line') from None
      if not isinstance(obj, dict):
        raise DataError(f'{path}:{n}: expected a JSON object, got {type(obj).__name__}; write one object per line')
      yield n, obj


class JsonlPairs:
  """Prompt/completion pairs from JSONL files matched by a glob: one JSON object per non-empty line, its prompt and
  completion under the given keys. All lines are read and checked up front (fine-tuning sets are small), so a bad
  line fails before training starts, naming the file and line."""

  def __init__(self, pattern: str, prompt_field: str = 'prompt', completion_field: str = 'completion'):
    self.pairs = []
    for path in glob(pattern):
      for n, obj in jsonl_objects(str(path)):
        for key in (prompt_field, completion_field):
          if not isinstance(obj.get(key), str):
            keys = ', '.join(sorted(obj)) or 'none'
            raise DataError(
              f'{path}:{n} has no string field {key!r} (its keys: {keys}); set --config.data.prompt_field / '
              'completion_field to the names your file uses'
            )
        self.pairs.append({'prompt': obj[prompt_field], 'completion': obj[completion_field]})
    if not self.pairs:
      raise DataError(f'the files matching {pattern!r} hold no prompt/completion line')

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i) -> dict:
    return self.pairs[int(i)]


def glob(pattern: str) -> list:
  """Files matching `pattern` (`*`, `?`, `[...]`, `**` in any component after the first), sorted; DataError if none."""
  parts = pattern.split('/')
  fixed = next((i for i, p in enumerate(parts) if any(c in p for c in '*?[')), len(parts))
  root = epath.Path('/'.join(parts[:fixed]) or '.')
  rest = '/'.join(parts[fixed:])
  paths = sorted(p for p in (root.glob(rest) if rest else [root]) if p.exists() and not p.is_dir())
  if not paths:
    raise DataError(
      f'no files match {pattern!r}. Give a glob of UTF-8 text files, e.g. '
      "--config.data.train_split='/data/books/train/*.txt'"
    )
  return paths


def documents(dc, split: str):
  """The documents of `split` of the dataset the data config `dc` names; DataError if there are none."""
  if dc.dataset == TEXT_FILES:
    return TextFiles(split, dc.file_docs)
  if dc.dataset == JSONL:
    return JsonlPairs(split, dc.prompt_field, dc.completion_field)
  if dc.dataset == config_lib.CHAT:
    from lmjax import chat  # pylint: disable=import-outside-toplevel

    return chat.ChatFiles(((f'{p}:{n}', obj) for p in glob(split) for n, obj in jsonl_objects(str(p))), split)
  if dc.dataset in TABLES:
    return TableFiles(split, dc.feature)
  source = text_source(dc.dataset, split, dc.data_dir or default_data_dir(), dc.manual_dir or None)
  if len(source) == 0:
    raise DataError(f'{dc.dataset!r} split {split!r} holds no examples; choose another split')
  docs = TFDSDocuments(source, dc.feature, dc.dataset)
  docs[0]  # a missing feature key fails here, before any training starts
  return docs
