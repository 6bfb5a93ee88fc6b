"""The safetensors files of a Hugging Face model directory: found, checked, and read without the safetensors library.

A file is an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}} and an
optional __metadata__ of strings), then the data, which the tensors' [begin, end) offsets tile exactly, with no
gap and no overlap (the format's rule, so no bytes hide in a file). Every claim a header makes is checked against
the file's size before any data is read or any array allocated; a file that breaks one is an InteropError naming
the file and the fault. tests/test_faults_hf.py fuzzes this reader against the library's.

Paths are checked too: a shard the index names, or a symlink in the directory, must resolve inside the model
directory (for a hub cache snapshot, inside that model's cache folder, whose blobs the snapshot links to).
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from lmjax.errors import InteropError
from lmjax.hf import hfconfig

SAFETENSORS, INDEX = 'model.safetensors', 'model.safetensors.index.json'
MAX_HEADER = 100_000_000  # bytes: the format's own limit on a header
MAX_TENSOR = 2**48  # bytes a shape may describe, zero-sized dimensions aside (numpy's arrays stop below 2**63)
ITEMSIZE = {
  'BOOL': 1,
  'U8': 1,
  'I8': 1,
  'F8_E5M2': 1,
  'F8_E4M3': 1,
  'I16': 2,
  'U16': 2,
  'F16': 2,
  'BF16': 2,
  'I32': 4,
  'U32': 4,
  'F32': 4,
  'I64': 8,
  'U64': 8,
  'F64': 8,
}
FLOATS = {'F32': np.float32, 'F16': np.float16, 'F64': np.float64, 'BF16': ml_dtypes.bfloat16}


# ---------------------------------------------------------------------------------------------- paths


def model_root(directory: str) -> str:
  """The folder every file of a model directory must resolve into: the directory itself, or for a snapshot in the
  hub cache (models--ORG--NAME/snapshots/REV, whose files link to ../../blobs) the model's cache folder."""
  real = os.path.realpath(directory)
  parent = os.path.dirname(real)
  if os.path.basename(parent) == 'snapshots' and os.path.basename(os.path.dirname(parent)).startswith('models--'):
    return os.path.dirname(parent)
  return real


def check_inside(path: str, root: str, what: str) -> str:
  """`path` when it resolves inside `root`, else an InteropError naming it (`what` says where the path came from)."""
  real = os.path.realpath(path)
  if os.path.commonpath([real, root]) != root:
    raise InteropError(
      f'{what} {path} resolves to {real}, outside the model directory {root}; lmjax reads only files inside it '
      '(copy the file in instead of linking or pointing to it)'
    )
  return path


def shard_files(directory: str, root: str | None = None) -> tuple[list[str], dict | None]:
  """(the safetensors files of a model directory, the index's {tensor: file} or None for a single file)."""
  root = root or model_root(directory)
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    weight_map = read_index(index)
    where = {k: os.path.normpath(os.path.join(directory, v)) for k, v in weight_map.items()}
    paths = [check_inside(p, root, f'{INDEX} names the shard') for p in where.values()]
    paths = sorted(set(paths))
    missing = [os.path.relpath(p, directory) for p in paths if not os.path.isfile(p)]
    if missing:
      raise InteropError(f'{INDEX} in {directory} names shards that are missing: {", ".join(missing)}')
    return paths, where
  single = os.path.join(directory, SAFETENSORS)
  if os.path.exists(single):
    return [check_inside(single, root, 'the weights file')], None
  pickled = [n for n in sorted(os.listdir(directory)) if n.endswith(('.bin', '.pt'))]
  if pickled:
    raise InteropError(
      f'{directory} holds only pickled weights ({", ".join(pickled)}); lmjax never unpickles downloaded files. '
      'Convert them once where you trust the file: python -c "import transformers as t; '
      f"t.AutoModelForCausalLM.from_pretrained('{directory}').save_pretrained('{directory}', "
      'safe_serialization=True)"'
    )
  raise InteropError(f'{directory} holds no {SAFETENSORS} (nor {INDEX}); save the model with save_pretrained')


def read_index(path: str) -> dict:
  """The index's weight_map {tensor name: shard file name}, or an InteropError saying what is wrong with it."""
  fix = 'download or save the model again'
  index = hfconfig.read_json(path, fix)
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise InteropError(f'{path} has no "weight_map" object of tensor name to shard file; {fix}')
  bad = [k for k, v in weight_map.items() if not isinstance(v, str) or not v or '\x00' in v]
  if bad:
    raise InteropError(f'{path} maps {_short(bad[0])} to {_short(weight_map[bad[0]])}, not a file name; {fix}')
  return weight_map


# ---------------------------------------------------------------------------------------------- one file


def read_header(path: str) -> dict:
  """{name: (dtype, shape, first byte, end byte)} of one safetensors file, every entry checked against its size."""

  def bad(why):
    return InteropError(
      f'{path} is not a valid safetensors file: {why}; save the model again with save_pretrained (or download '
      'the file again)'
    )

  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
      raise bad(f'it has {size} bytes, fewer than the 8 of its header length')
    (n,) = struct.unpack('<Q', f.read(8))
    if n > MAX_HEADER:
      raise bad(f'its header length field says {n} bytes, more than the format allows ({MAX_HEADER})')
    if n > size - 8:
      raise bad(f'its header length field says {n} bytes, but only {size - 8} follow it (a truncated file?)')
    raw = f.read(n)
  if len(raw) != n or not raw.startswith(b'{'):
    raise bad('its header is not a JSON object')
  try:
    header = json.loads(raw.decode('utf-8'), object_pairs_hook=_unique_keys)
  except (ValueError, RecursionError) as e:
    raise bad(f'its header is not valid JSON ({_short(e, 120)})') from None
  if not isinstance(header, dict):
    raise bad('its header is not a JSON object')
  data = size - 8 - n
  entries = {}
  for name, info in header.items():
    if name == '__metadata__':
      if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
        raise bad('its __metadata__ is not an object of strings')
    else:
      entries[name] = _entry(name, info, bad)
  at = 0
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
    if begin != at:
      raise bad(f'tensor {_short(name)} starts at data byte {begin}, not {at}: tensors overlap or leave a gap')
    at = end
  if at != data:
    raise bad(f'its tensors end at data byte {at} but the file holds {data} bytes of data (truncated or padded?)')
  return {name: (dtype, shape, 8 + n + begin, 8 + n + end) for name, (dtype, shape, begin, end) in entries.items()}


def _entry(name: str, info, bad) -> tuple:
  if not isinstance(info, dict):
    raise bad(f'tensor {_short(name)} is described by a JSON {type(info).__name__}, not an object')
  dtype, shape, offsets = info.get('dtype'), info.get('shape'), info.get('data_offsets')
  if not isinstance(dtype, str) or dtype not in ITEMSIZE:
    raise bad(f'tensor {_short(name)} has dtype {_short(dtype)}; the format knows {", ".join(ITEMSIZE)}')
  if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
    raise bad(f'tensor {_short(name)} has shape {_short(shape)}, not a list of sizes')
  if math.prod(max(d, 1) for d in shape) * ITEMSIZE[dtype] > MAX_TENSOR:
    raise bad(f'tensor {_short(name)} has shape {_short(shape)}, too large to be real')
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets)) and offsets[0] <= offsets[1]):
    raise bad(f'tensor {_short(name)} has data_offsets {_short(offsets)}, not [begin, end] with 0 <= begin <= end')
  begin, end = offsets
  if math.prod(shape) * ITEMSIZE[dtype] != end - begin:
    raise bad(
      f'tensor {_short(name)} ({dtype}, shape {shape}) needs {math.prod(shape) * ITEMSIZE[dtype]} bytes, but its '
      f'data_offsets span {end - begin}'
    )
  return dtype, tuple(shape), begin, end


def _is_size(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _unique_keys(pairs: list) -> dict:
  out = dict(pairs)
  if len(out) != len(pairs):
    raise ValueError('a name appears twice')
  return out


def _short(x, limit: int = 60) -> str:
  """repr of a value from a file, cut short: a damaged header may hold anything, of any length."""
  text = repr(x) if not isinstance(x, BaseException) else ' '.join(str(x).split())
  return text if len(text) <= limit else text[: limit - 3] + '...'


# ---------------------------------------------------------------------------------------------- a directory


class Tensors:
  """The tensors of a directory's safetensors files by name, each read from disk when asked for.

  The files are read with plain reads at the offsets their headers give. The `safetensors` library's reader
  memory-maps the whole file instead, and the mapped pages count as resident beside the converted copies: for
  GPT-2 124M that is the model's size once more at the peak. tests/test_hf.py checks this reader against the
  library's."""

  def __init__(self, directory: str, root: str | None = None):
    self._where = {}  # name -> (path, dtype, shape, first byte, end byte)
    paths, weight_map = shard_files(directory, root)
    for path in paths:
      for name, entry in read_header(path).items():
        if name in self._where:
          raise InteropError(f'tensor {name} is in both {self._where[name][0]} and {path}; keep one of the two')
        self._where[name] = (path, *entry)
    for name, path in (weight_map or {}).items():
      if self._where.get(name, (path,))[0] != path:
        raise InteropError(f'{INDEX} puts {name} in {path}, but it is in {self._where[name][0]}; save the model again')
      if name not in self._where:
        raise InteropError(f'{INDEX} puts {name} in {path}, which does not hold it; save the model again')

  def names(self) -> set:
    return set(self._where)

  def shape(self, name: str) -> tuple:
    return self._where[name][2]

  def rename(self, names: dict) -> None:
    """Renames tensors: {name in the files: name the family's code uses}; names not in `names` stay."""
    self._where = {names.get(n, n): v for n, v in self._where.items()}

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32."""
    path, dtype, shape, begin, end = self._where[name]
    if dtype not in FLOATS:
      raise InteropError(f'{name} in {path} is {dtype}; lmjax reads F32, F16, BF16 and F64 weights')
    with open(path, 'rb') as f:
      f.seek(begin)
      raw = f.read(end - begin)
    if len(raw) != end - begin:
      raise InteropError(f'{path} became shorter while {name} was read; is another program writing it?')
    x = np.frombuffer(raw, FLOATS[dtype]).reshape(shape)
    return x if x.dtype == np.float32 else x.astype(np.float32)
