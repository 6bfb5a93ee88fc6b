"""Tests for lmjax.sources: local, checksummed, TF-free TFDS text sources."""

import hashlib
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from lmjax import sources

SHARED = Path(__file__).resolve().parents[1].parent / 'shared/data/tinyshakespeare'
INPUT = SHARED / 'input.txt'
SIZE = 1_115_394
SHA = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
needs_input = pytest.mark.skipif(not INPUT.is_file(), reason=f'no {INPUT}')


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any network attempt fails loudly instead of hanging."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A data_dir with tiny_shakespeare prepared once for the module."""
  if not INPUT.is_file():
    pytest.skip(f'no {INPUT}')
  path = tmp_path_factory.mktemp('tfds')
  sources.prepare_tiny_shakespeare(str(path), str(SHARED))
  return str(path)


def test_registered_checksum_is_the_known_file():
  assert sources._registered_checksum() == (SIZE, SHA)


def test_prepare_builds_stock_dataset_without_tensorflow(data_dir):
  version_dir = Path(data_dir) / 'tiny_shakespeare' / '1.0.0'
  assert sorted(p.name for p in version_dir.glob('*.array_record-*')) == [
    f'tiny_shakespeare-{s}.array_record-00000-of-00001' for s in ('test', 'train', 'validation')
  ]
  # The stock registered builder reads it, with its own splits and feature.
  source = tfds.data_source('tiny_shakespeare', split='train', data_dir=data_dir, download=False)
  assert len(source) == 1 and set(source[0]) == {'text'}
  assert 'tensorflow' not in sys.modules


def test_split_lengths_match_nanogpt_cut(data_dir):
  full = INPUT.read_text(encoding='utf-8')
  train = sources.tiny_shakespeare_text(data_dir, None, 'train')
  heldout = sources.tiny_shakespeare_text(data_dir, None, 'validation+test')
  assert len(train) == 1_003_854 and train == full[:1_003_854]
  assert len(heldout) == 111_540 and heldout == full[-111_540:]
  assert len(sources.tiny_shakespeare_text(data_dir, None, 'validation')) == 55_770


def test_text_source_is_random_access(data_dir):
  source = sources.text_source('tiny_shakespeare', 'validation+test', data_dir)
  assert len(source) == 2
  assert isinstance(sources.feature_text(source[1], 'text', 'x'), str)


def test_second_prepare_is_fast_and_does_not_rebuild(data_dir, monkeypatch):
  info = Path(data_dir) / 'tiny_shakespeare/1.0.0/dataset_info.json'
  mtime = info.stat().st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('rebuilt a prepared dataset')

  monkeypatch.setattr(sources._LocalTinyShakespeare, 'download_and_prepare', fail)
  monkeypatch.setattr(sources, '_read_verified', fail)
  start = time.perf_counter()
  sources.prepare_tiny_shakespeare(data_dir, '/nonexistent')
  assert time.perf_counter() - start < 1.0
  assert info.stat().st_mtime_ns == mtime


def test_missing_file_names_path_size_and_sha(tmp_path):
  with pytest.raises(sources.DataError) as e:
    sources.prepare_tiny_shakespeare(str(tmp_path / 'data'), str(tmp_path / 'manual'))
  msg = str(e.value)
  assert str(tmp_path / 'manual' / 'input.txt') in msg
  assert str(SIZE) in msg and SHA in msg and '--config.data.manual_dir' in msg
  assert not (tmp_path / 'data' / 'tiny_shakespeare').exists()


def test_unprepared_without_manual_dir_is_data_error(tmp_path):
  with pytest.raises(sources.DataError, match='manual_dir'):
    sources.text_source('tiny_shakespeare', 'train', str(tmp_path))


def _corrupt_copy(kind: str) -> bytes:
  data = INPUT.read_bytes()
  if kind == 'truncated':
    return data[:-10]
  flipped = bytearray(data)
  flipped[1000] ^= 1  # Same size, so only the sha256 can catch it.
  return bytes(flipped)


@needs_input
@pytest.mark.parametrize('kind', ['flipped', 'truncated'])
def test_corrupt_file_is_data_error(tmp_path, kind):
  content = _corrupt_copy(kind)
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'input.txt').write_bytes(content)
  with pytest.raises(sources.DataError) as e:
    sources.prepare_tiny_shakespeare(str(tmp_path / 'data'), str(manual))
  msg = str(e.value)
  assert str(manual / 'input.txt') in msg and SHA in msg and str(SIZE) in msg
  assert hashlib.sha256(content).hexdigest() in msg and str(len(content)) in msg
  assert not (tmp_path / 'data' / 'tiny_shakespeare').exists()


@needs_input
def test_good_copy_elsewhere_is_accepted(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  shutil.copy(INPUT, manual / 'input.txt')
  text = sources.tiny_shakespeare_text(str(tmp_path / 'data'), str(manual), 'test')
  assert len(text) == 55_770


def test_unknown_dataset_lists_close_matches(tmp_path):
  with pytest.raises(sources.DataError, match="'tiny_shakespeare'"):
    sources.text_source('tiny_shakespear', 'train', str(tmp_path))


def test_unprepared_other_dataset_fails_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(sources.DataError, match='not prepared.*tfds build lm1b'):
    sources.text_source('lm1b', 'train', str(tmp_path))
  assert time.perf_counter() - start < 5.0


def test_unknown_split_lists_available(data_dir):
  with pytest.raises(sources.DataError, match=r"'valid'.*\['test', 'train', 'validation'\]"):
    sources.text_source('tiny_shakespeare', 'train+valid', data_dir)


def test_feature_text_on_mocked_dataset(tmp_path):
  with tfds.testing.mock_data(num_examples=2):
    source = tfds.data_source('lm1b', split='train', data_dir=str(tmp_path))
    example = source[0]
  assert isinstance(sources.feature_text(example, 'text', 'lm1b'), str)
  with pytest.raises(sources.DataError, match=r"no feature 'content'.*\['text'\]"):
    sources.feature_text(example, 'content', 'lm1b')


def _dc(**kw):
  from lmjax import config as config_lib

  dc = config_lib.default_config().data
  for k, v in kw.items():
    dc[k] = v
  return dc


def test_documents_with_missing_feature_key_fail_before_training(data_dir):
  with pytest.raises(sources.DataError, match=r"no feature 'content'.*\['text'\]"):
    sources.documents(_dc(data_dir=data_dir, feature='content'), 'train')


def test_text_files_one_document_per_file_or_line(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'a.txt').write_text('one\ntwo\n\n')
  (tmp_path / 'sub' / 'b.txt').write_text('three ☃')
  per_file = sources.documents(_dc(dataset='text_files'), str(tmp_path / '*' / '*.txt'))
  assert [per_file[i] for i in range(len(per_file))] == ['one\ntwo\n\n', 'three ☃']
  per_line = sources.documents(_dc(dataset='text_files', file_docs='line'), str(tmp_path / 'sub/*.txt'))
  assert [per_line[i] for i in range(len(per_line))] == ['one', 'two', 'three ☃']


def test_empty_glob_and_empty_files_are_data_errors(tmp_path):
  with pytest.raises(sources.DataError, match='no files match'):
    sources.documents(_dc(dataset='text_files'), str(tmp_path / '*.txt'))
  (tmp_path / 'empty.txt').write_text('\n\n')
  with pytest.raises(sources.DataError, match='hold no text'):
    sources.documents(_dc(dataset='text_files', file_docs='line'), str(tmp_path / '*.txt'))
