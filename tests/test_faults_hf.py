"""Faults at the Hugging Face surfaces: malformed safetensors files (fuzzed against the library's own reader),
damaged config.json, index and tokenizer files, paths and symlinks leading out of the model directory, imports
into directories they must not write, exports and compares onto files, and hub names with no network. Each fault
is one line naming the file or path and what is wrong, and nothing is written (lmjax/hf/, lmjax/workdir.py)."""

import copy
import hashlib
import json
import os
import pathlib
import random
import shutil
import socket
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import REPO

from lmjax import cli, errors, hf, inference

SEED = 20261215
_DTYPES = {
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'F64': np.float64,
  'I64': np.int64,
  'I32': np.int32,
  'U8': np.uint8,
}


def _one_line(e: BaseException, *names: str):
  """An error a user reads: one line, naming what it is about."""
  text = str(e)
  assert '\n' not in text, text
  for name in names:
    assert str(name) in text, f'{name} not named in: {text}'
  return text


def _run(*args, env=None):
  env = {**os.environ, **(env or {})}
  return subprocess.run(
    [sys.executable, '-m', 'lmjax', *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False
  )


def _refused(proc, *names):
  """A command refused as the CLI should: exit 2 and one line on stderr naming `names`."""
  assert proc.returncode == 2, proc.stderr
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('lmjax ') and 'error:' in line and 'Traceback' not in proc.stderr
  for name in names:
    assert str(name) in line, line
  return line


def _tree_digest(directory) -> dict:
  return {
    os.path.relpath(os.path.join(d, n), directory): hashlib.sha256(pathlib.Path(d, n).read_bytes()).hexdigest()
    for d, _, names in os.walk(directory)
    for n in names
  }


def _copy(src, dst):
  shutil.copytree(src, dst, symlinks=True)
  return str(dst)


def _json(path):
  return json.loads(pathlib.Path(path).read_text())


def _truncate(path):
  text = pathlib.Path(path).read_text()
  pathlib.Path(path).write_text(text[: len(text) // 2])


def _drop(obj: dict, key: str) -> None:
  del obj[key]


def _edit_json(path, change):
  """Rewrites a JSON file: `change` edits the object in place, or returns the object to write instead."""
  with open(path) as f:
    obj = json.load(f)
  obj = change(obj) or obj
  with open(path, 'w') as f:
    json.dump(obj, f)


# ---------------------------------------------------------------------------------------------- safetensors fuzz


def _base() -> tuple[dict, bytes]:
  """A small valid safetensors header and data: floats of every width lmjax reads, an integer tensor, a scalar
  and an empty tensor."""
  rng = np.random.default_rng(0)
  arrays = [
    ('a', 'F32', rng.standard_normal((2, 3)).astype(np.float32)),
    ('b', 'F16', rng.standard_normal(4).astype(np.float16)),
    ('c', 'BF16', rng.standard_normal((3, 1)).astype(ml_dtypes.bfloat16)),
    ('d', 'I64', np.arange(2, dtype=np.int64)),
    ('e', 'F32', np.float32(1.5).reshape(())),
    ('f', 'F64', rng.standard_normal(2)),
    ('g', 'F32', rng.standard_normal(4).astype(np.float32)),  # the same size as d: their offsets may be swapped
    ('z', 'F32', np.zeros((0, 4), np.float32)),
  ]
  header, data = {'__metadata__': {'format': 'pt'}}, b''
  for name, dtype, x in arrays:
    raw = x.tobytes()
    header[name] = {'dtype': dtype, 'shape': list(x.shape), 'data_offsets': [len(data), len(data) + len(raw)]}
    data += raw
  return header, data


def _file(header, data: bytes, pad: int = 0) -> bytes:
  head = (json.dumps(header) if not isinstance(header, bytes) else header.decode('latin-1')).encode() + b' ' * pad
  return struct.pack('<Q', len(head)) + head + data


_ODD_VALUES = [None, True, -1, 1.5, 2**64, 2**70, 'x', '', [], {}, [1], [-1, 2], [0, 2**62], [2**40, 2**40], 'F32']


def _mutate_entry(rng: random.Random, header: dict, data: bytes) -> bytes:
  name = rng.choice([n for n in header if n != '__metadata__'])
  info = header[name]
  kind = rng.choice(['dtype', 'shape', 'offsets', 'drop', 'replace', 'extra', 'shift'])
  if kind == 'dtype':
    info['dtype'] = rng.choice([*_DTYPES, 'F8_E4M3', 'U16', 'F33', 'f32', 'Q4', *_ODD_VALUES[:6]])
  elif kind == 'shape':
    shape = list(info['shape'])
    choice = rng.randrange(5)
    if choice == 0 and shape:
      shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**31, -(2**31)])
    elif choice == 1:
      shape = shape[::-1] + [1] * rng.randrange(3)  # the same size, another shape: still valid
    elif choice == 2:
      shape.append(rng.choice(_ODD_VALUES))
    elif choice == 3:
      shape = rng.choice(_ODD_VALUES)
    else:
      shape = [0] + shape
    info['shape'] = shape
  elif kind == 'offsets':
    begin, end = info['data_offsets']
    info['data_offsets'] = rng.choice(
      [[end, begin], [begin, end + 1], [begin - 1, end], [begin, end + len(data)], [begin], [begin, end, end]]
      + [[begin + 2**64, end], rng.choice(_ODD_VALUES), [float(begin), end], [begin, str(end)]]
    )
  elif kind == 'drop':
    del info[rng.choice(['dtype', 'shape', 'data_offsets'])]
  elif kind == 'replace':
    header[name] = rng.choice(_ODD_VALUES)
  elif kind == 'extra':
    info['unexpected'] = rng.choice(_ODD_VALUES)  # the library ignores unknown keys; so may lmjax
  else:  # every tensor moved: a gap at the start, or data past the end
    delta = rng.choice([-1, 1, 8])
    for n, other in header.items():
      if n != '__metadata__':
        other['data_offsets'] = [x + delta for x in other['data_offsets']]
  return _file(header, data)


def _mutated(rng: random.Random) -> bytes:
  """One seeded case: a valid file, or a file damaged in one way (structure, values or raw bytes)."""
  header, data = copy.deepcopy(_base())
  blob = _file(header, data)
  kind = rng.choice(['valid', 'entry', 'entry', 'entry', 'entry', 'truncate', 'append', 'length', 'flip', 'flip'])
  kind = rng.choice([kind, kind, kind, 'json', 'metadata', 'swap', 'random', 'pad'])
  if kind == 'valid':
    return blob
  if kind == 'entry':
    return _mutate_entry(rng, header, data)
  if kind == 'truncate':
    return blob[: rng.randrange(len(blob))]
  if kind == 'append':
    return blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
  if kind == 'length':
    n = struct.unpack('<Q', blob[:8])[0]
    value = rng.choice([0, 1, 7, n - 1, n + 1, len(blob), 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack('<Q', value) + blob[8:]
  if kind == 'flip':
    n = struct.unpack('<Q', blob[:8])[0]
    out = bytearray(blob)
    for _ in range(rng.randint(1, 3)):
      out[8 + rng.randrange(n)] = rng.randrange(256)
    return bytes(out)
  if kind == 'json':
    value = rng.choice([[], [1, 2], 3, 'header', None, {}, {'a': 1}, [[[[[]]]]], {'a': {'dtype': 'F32'}}])
    return _file(value, data)
  if kind == 'metadata':
    header['__metadata__'] = rng.choice([{'format': 'pt', 'x': 'y'}, {'x': 1}, [], 'pt', None, {}])
    return _file(header, data)
  if kind == 'swap':  # two tensors of one size trade places: a valid file, with other values
    header['d']['data_offsets'], header['g']['data_offsets'] = header['g']['data_offsets'], header['d']['data_offsets']
    return _file(header, data)
  if kind == 'pad':  # trailing spaces in the header, as the library's writer adds: valid
    return _file(header, data, pad=rng.randint(1, 7))
  return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))


def _library(blob: bytes):
  """{name: (dtype, shape, data)} as the safetensors library reads `blob`, or None when it refuses it."""
  import safetensors

  try:
    return {name: (t['dtype'], tuple(t['shape']), bytes(t['data'])) for name, t in safetensors.deserialize(blob)}
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException:  # pylint: disable=broad-except  -- a SafetensorError, or a Rust panic (a BaseException)
    return None


def test_fuzzed_safetensors_files_read_as_the_library_reads_them_or_are_one_line_errors(tmp_path):
  """Seeded random and mutated files: lmjax's reader returns exactly the library's tensors, or refuses the file
  in one line naming it; it never accepts a file the library refuses, and never raises anything else."""
  pytest.importorskip('safetensors')
  rng = random.Random(SEED)
  path = tmp_path / 'model.safetensors'
  accepted = refused = 0
  for case in range(400):
    blob = _mutated(rng)
    path.write_bytes(blob)
    theirs = _library(blob)
    try:
      ours = hf.Tensors(str(tmp_path))
    except errors.InteropError as e:
      _one_line(e, path)
      refused += 1
      continue
    assert theirs is not None, f'case {case}: lmjax read a file the library refuses: {blob[:200]!r}'
    assert ours.names() == set(theirs), case
    for name, (dtype, shape, raw) in theirs.items():
      assert ours.shape(name) == shape, (case, name)
      if dtype in ('F32', 'F16', 'BF16', 'F64'):
        want = np.frombuffer(raw, _DTYPES[dtype]).astype(np.float32).reshape(shape)
        np.testing.assert_array_equal(ours.get(name), want)
      else:
        with pytest.raises(errors.InteropError, match=f'{name} in .* is {dtype}; lmjax reads F32'):
          ours.get(name)
    accepted += 1
  assert accepted > 40 and refused > 200, (accepted, refused)  # both outcomes are exercised


@pytest.mark.parametrize(
  'blob, says',
  [
    (b'', 'fewer than the 8 of its header length'),
    (struct.pack('<Q', 2**63) + b'{}', 'more than the format allows'),
    (struct.pack('<Q', 10_000) + b'{"a": 1}', 'only 8 follow it'),
    (_file([1, 2], b''), 'not a JSON object'),
    (_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b'\0' * 4), 'end at data byte 8'),
    (_file({'a': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, b'\0' * 8), 'needs 12 bytes'),
    (_file({'a': {'dtype': 'X9', 'shape': [2], 'data_offsets': [0, 8]}}, b'\0' * 8), "dtype 'X9'"),
    (b'PK\x03\x04' + b'\0' * 60, 'header length field says'),  # a zip file, not safetensors
  ],
  ids=['empty', 'absurd-length', 'length-past-end', 'json-list', 'truncated-data', 'shape-vs-offsets', 'dtype', 'zip'],
)
def test_each_kind_of_bad_safetensors_file_is_named(blob, says, tmp_path):
  (tmp_path / 'model.safetensors').write_bytes(blob)
  with pytest.raises(errors.InteropError) as e:
    hf.Tensors(str(tmp_path))
  assert says in _one_line(e.value, tmp_path / 'model.safetensors')


def test_a_truncated_model_file_is_one_line_from_the_cli_and_no_workdir_is_made(hf_models, tmp_path):
  src = _copy(hf_models['gpt2'], tmp_path / 'src')
  weights = os.path.join(src, 'model.safetensors')
  with open(weights, 'r+b') as f:
    f.truncate(os.path.getsize(weights) // 2)
  proc = _run('import-hf', f'--from={src}', f'--workdir={tmp_path / "w"}')
  _refused(proc, weights, 'truncated')
  assert not os.path.exists(tmp_path / 'w')


# ---------------------------------------------------------------------------------------------- config and index


@pytest.mark.parametrize(
  'change, says',
  [
    ('truncate', 'is not valid JSON'),
    (lambda c: [c], 'holds a JSON list, not an object'),
    (lambda c: _drop(c, 'n_embd'), "has no 'n_embd'"),
    (lambda c: c.update(n_head='4'), "n_head='4'; expected an integer"),
    (lambda c: c.update(n_head=5), 'd_model (48) must be divisible by n_heads (5)'),
    (lambda c: c.update(layer_norm_epsilon=[1]), 'layer_norm_epsilon=[1]; expected a number'),
    (lambda c: c.update(architectures='GPT2LMHeadModel', n_layer=0), 'n_layer=0; expected an integer >= 1'),
    (lambda c: c.update(architectures={'a': 1}), 'expected a list of class names'),
  ],
  ids=['truncated', 'list', 'missing-key', 'string-int', 'bad-shape', 'list-float', 'zero-layers', 'arch-object'],
)
def test_a_damaged_config_json_is_named_before_any_weight_is_read(change, says, hf_models, tmp_path):
  src = _copy(hf_models['gpt2'], tmp_path / 'src')
  path = os.path.join(src, 'config.json')
  if change == 'truncate':
    _truncate(path)
  else:
    _edit_json(path, change)
  with pytest.raises(errors.InteropError) as e:
    hf.read(src)
  assert says in _one_line(e.value, 'config.json')


def test_a_llama_rope_block_of_the_wrong_kind_is_named(hf_models, tmp_path):
  src = _copy(hf_models['llama'], tmp_path / 'src')
  for value, says in ((['llama3'], 'rope_parameters=[...'), ({'rope_type': 'llama3', 'factor': 8.0}, "no 'low_freq")):
    _edit_json(os.path.join(src, 'config.json'), lambda c, v=value: c.update(rope_parameters=v, rope_scaling=None))
    with pytest.raises(errors.InteropError) as e:
      hf.read(src)
    assert says.split('[')[0] in _one_line(e.value, 'config.json')


_FIRST_SHARD = 'model-00001-of-00005.safetensors'  # llama_tied is saved in five shards


@pytest.mark.parametrize(
  'change, says',
  [
    ('truncate', 'is not valid JSON'),
    (lambda i: [i], 'has no "weight_map"'),
    (lambda i: _drop(i, 'weight_map'), 'has no "weight_map"'),
    (lambda i: i['weight_map'].update({'model.norm.weight': 7}), 'not a file name'),
    (lambda i: i['weight_map'].update({'model.norm.weight': 'nowhere.safetensors'}), 'shards that are missing'),
    (lambda i: i['weight_map'].update({'model.norm.weight': _FIRST_SHARD}), 'but it is in'),
    (lambda i: i['weight_map'].update({'no.such.tensor': _FIRST_SHARD}), 'does not hold it'),
  ],
  ids=['truncated', 'list', 'no-weight-map', 'non-string', 'missing-shard', 'wrong-shard', 'absent-tensor'],
)
def test_a_damaged_shard_index_is_named(change, says, hf_models, tmp_path):
  src = _copy(hf_models['llama_tied'], tmp_path / 'src')
  path = os.path.join(src, hf.INDEX)
  assert _json(path)['weight_map']['model.norm.weight'] != _FIRST_SHARD  # so 'wrong-shard' is wrong
  if change == 'truncate':
    _truncate(path)
  else:
    _edit_json(path, change)
  with pytest.raises(errors.InteropError) as e:
    hf.read(src)
  assert says in _one_line(e.value, hf.INDEX)


# ---------------------------------------------------------------------------------------------- paths


def test_shards_and_symlinks_that_lead_outside_the_model_directory_are_refused(hf_models, tmp_path):
  src = _copy(hf_models['llama_tied'], tmp_path / 'src')
  outside = tmp_path / 'outside'
  os.makedirs(outside)
  shard = _json(os.path.join(src, hf.INDEX))['weight_map']['model.norm.weight']
  shutil.move(os.path.join(src, shard), outside / shard)
  index = os.path.join(src, hf.INDEX)
  original = _json(index)
  for name in (f'../outside/{shard}', str(outside / shard)):
    _edit_json(index, lambda i, n=name: {'weight_map': {k: n if v == shard else v for k, v in i['weight_map'].items()}})
    with pytest.raises(errors.InteropError) as e:
      hf.read(src)
    assert 'outside the model directory' in _one_line(e.value, shard)
  pathlib.Path(index).write_text(json.dumps(original))
  os.symlink(outside / shard, os.path.join(src, shard))  # the index is as saved; the shard is a link out
  with pytest.raises(errors.InteropError) as e:
    hf.read(src)
  assert 'the symlink' in _one_line(e.value, os.path.join(src, shard), 'outside the model directory')
  os.remove(os.path.join(src, shard))
  shutil.move(outside / shard, os.path.join(src, 'real.safetensors'))
  os.symlink('real.safetensors', os.path.join(src, shard))  # a link that stays inside is fine
  assert hf.read(src).architecture == 'LlamaForCausalLM'


def _fake_hub_cache(home, repo, src, link_out=None):
  """HF_HOME/hub laid out as huggingface_hub writes it: snapshot files are links into the model's blobs/."""
  folder = os.path.join(home, 'hub', 'models--' + repo.replace('/', '--'))
  commit = hashlib.sha1(repo.encode()).hexdigest()
  os.makedirs(os.path.join(folder, 'refs'))
  os.makedirs(os.path.join(folder, 'blobs'))
  snapshot = os.path.join(folder, 'snapshots', commit)
  os.makedirs(snapshot)
  pathlib.Path(folder, 'refs', 'main').write_text(commit)
  for name in os.listdir(src):
    blob = hashlib.sha256(name.encode()).hexdigest()
    shutil.copy(os.path.join(src, name), os.path.join(folder, 'blobs', blob))
    target = link_out if name == 'tokenizer.json' and link_out else os.path.join('..', '..', 'blobs', blob)
    os.symlink(target, os.path.join(snapshot, name))


_READ_NAMES = (
  'import sys\nfrom lmjax import errors, hf\nfor name in sys.argv[1:]:\n  try:\n    print("ok", hf.read(name).architecture)\n'
  '  except errors.UserError as e:\n    print("error", errors.one_line(e))\n'
)


def test_a_hub_name_reads_from_the_local_cache_offline_and_names_what_is_missing(hf_models, tmp_path):
  home = str(tmp_path / 'hf_home')
  _fake_hub_cache(home, 'org/tiny', hf_models['gpt2'])
  outside = tmp_path / 'elsewhere.json'
  shutil.copy(os.path.join(hf_models['gpt2'], 'tokenizer.json'), outside)
  _fake_hub_cache(home, 'org/linked-out', hf_models['gpt2'], link_out=str(outside))
  proc = subprocess.run(
    [sys.executable, '-c', _READ_NAMES, 'org/tiny', 'org/linked-out', 'org/absent'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
    check=False,
    env={**os.environ, 'HF_HOME': home, 'HF_HUB_OFFLINE': '1'},
  )
  assert proc.returncode == 0, proc.stderr
  tiny, linked, absent = proc.stdout.strip().splitlines()
  assert tiny == 'ok GPT2LMHeadModel'  # links into the model's own blobs/ are what a cache is made of
  assert linked.startswith('error') and 'outside the model directory' in linked and str(outside) in linked
  assert absent.startswith('error') and 'org/absent is not a directory, and is not in the local hub cache' in absent
  assert 'HF_HUB_OFFLINE=1' in absent and 'hf download org/absent' in absent


def test_a_hub_name_with_no_network_is_one_line(tmp_path):
  """No network, simulated by a hub endpoint that refuses connections (nothing can hang), and offline mode."""
  with socket.socket() as s:  # a port nothing listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {'HF_HOME': str(tmp_path / 'home'), 'HF_HUB_OFFLINE': '0', 'HF_ENDPOINT': f'http://127.0.0.1:{port}'}
  line = _refused(_run('import-hf', '--from=org/model', f'--workdir={tmp_path / "w"}', env=env), 'org/model')
  assert 'not in the local hub cache' in line and 'cannot be reached' in line and 'hf download org/model' in line
  env['HF_HUB_OFFLINE'] = '1'
  line = _refused(_run('import-hf', '--from=org/model', f'--workdir={tmp_path / "w"}', env=env), 'org/model')
  assert 'HF_HUB_OFFLINE=1 forbids downloading it' in line
  assert not os.path.exists(tmp_path / 'w')


# ---------------------------------------------------------------------------------------------- where imports write


@pytest.fixture(scope='module')
def imported_gpt2(hf_models, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('imported') / 'gpt2')
  hf.import_hf(hf_models['gpt2'], workdir)
  return workdir


def test_import_into_its_own_source_directory_is_refused_and_changes_nothing(hf_models, tmp_path):
  src = _copy(hf_models['gpt2'], tmp_path / 'src')
  before = _tree_digest(src)
  with pytest.raises(errors.InteropError) as e:
    hf.import_hf(src, src)
  assert 'is the model directory being imported' in _one_line(e.value, src)
  assert _tree_digest(src) == before


def test_import_into_a_live_run_or_a_foreign_directory_is_refused_and_changes_nothing(hf_models, tmp_path):
  live = tmp_path / 'live'  # a run that started and holds the lock, before its first checkpoint
  os.makedirs(live / 'checkpoints')
  (live / 'config.json').write_text('{"model": {}}')
  (live / 'lock.json').write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': 'now'}))
  foreign = tmp_path / 'foreign'  # somebody's directory
  os.makedirs(foreign)
  (foreign / 'notes.txt').write_text('mine')
  (foreign / 'config.json').write_text('{}')
  for workdir, says in ((live, 'is in use by a run'), (foreign, 'holds notes.txt, which `lmjax import-hf` does not')):
    before = _tree_digest(workdir)
    with pytest.raises(errors.WorkdirError) as e:
      hf.import_hf(hf_models['gpt2'], str(workdir))
    assert says in _one_line(e.value, workdir)
    assert _tree_digest(workdir) == before


def test_an_import_that_stopped_early_with_a_stale_lock_is_written_again(hf_models, tmp_path, imported_gpt2):
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()  # a pid that no longer runs
  workdir = tmp_path / 'again'
  os.makedirs(workdir / 'checkpoints')
  (workdir / 'config.json').write_text('{"half": "written"}')
  (workdir / 'lock.json').write_text(json.dumps({'host': socket.gethostname(), 'pid': gone.pid, 'since': 'then'}))
  summary = hf.import_hf(hf_models['gpt2'], str(workdir))
  assert summary['architecture'] == 'GPT2LMHeadModel'
  assert _json(workdir / 'config.json') == _json(os.path.join(imported_gpt2, 'config.json'))
  assert not os.path.exists(workdir / 'lock.json')  # the import held the lock and let it go
  with pytest.raises(errors.InteropError, match='already holds checkpoints'):
    hf.import_hf(hf_models['gpt2'], str(workdir))


def test_export_to_a_file_and_compare_out_a_file_are_one_line(imported_gpt2, tmp_path, capsys):
  target = tmp_path / 'taken'
  target.write_text('keep me')
  with pytest.raises(errors.InteropError) as e:
    inference.export_hf(imported_gpt2, str(target))
  assert 'is a file' in _one_line(e.value, target)
  assert cli.main(['compare', imported_gpt2, f'--out={target}']) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  assert line.startswith('lmjax compare: error:') and str(target) in line and 'is a file' in line
  assert target.read_text() == 'keep me'


# ---------------------------------------------------------------------------------------------- special tokens


def _specials(src, tokenizer_config=None, **ids):
  """Sets the special ids config.json gives (None: drops them), and tokenizer_config.json's token strings."""

  def set_ids(c):
    for k, v in ids.items():
      c.pop(k, None) if v is None else c.update({k: v})

  _edit_json(os.path.join(src, 'config.json'), set_ids)
  if os.path.exists(os.path.join(src, 'generation_config.json')):
    _edit_json(os.path.join(src, 'generation_config.json'), set_ids)
  if tokenizer_config is not None:
    _edit_json(os.path.join(src, 'tokenizer_config.json'), lambda c: c.update(tokenizer_config))


def test_special_tokens_the_files_name_but_the_vocabulary_lacks_are_not_dropped(hf_models, tmp_path, capfd):
  src = _copy(hf_models['gpt2'], tmp_path / 'src')
  _specials(src, {'eos_token': '<|im_end|>'}, bos_token_id=0, eos_token_id=None)
  with pytest.raises(errors.TokenizerError) as e:
    hf.read(src)
  assert 'would never learn to stop' in _one_line(e.value, 'tokenizer_config.json', "eos_token '<|im_end|>'")

  _specials(src, {'eos_token': '<|endoftext|>'}, eos_token_id=99_999)
  with pytest.raises(errors.TokenizerError) as e:
    hf.read(src)
  assert "tokenizer.json's vocabulary of" in _one_line(e.value, 'config.json gives eos_token_id=99999')

  _specials(src, {'pad_token': '<pad>'}, eos_token_id=0, pad_token_id=None)  # a missing pad: said, not fatal
  model = hf.read(src)
  assert model.tokenizer.eos_id == 0 and model.tokenizer.pad_id is None
  assert "names pad_token '<pad>', which is not in tokenizer.json's vocabulary" in capfd.readouterr().err

  pathlib.Path(src, 'tokenizer_config.json').write_text('{"eos_token": "<|endof')
  with pytest.raises(errors.TokenizerError) as e:
    hf.read(src)
  assert 'cannot be read as JSON' in _one_line(e.value, 'tokenizer_config.json')
