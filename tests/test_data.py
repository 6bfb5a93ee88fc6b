"""Tests for lmjax.data: packing, sharding, resume, segment boundaries, eval bytes; no network."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import grain
from lmjax import config as config_lib, data, model as model_lib, sources, tokenizers

DOCS = ['a', 'hello world', '', 'x' * 40, 'short', 'é ☃ ünïcode', 'the quick brown fox', 'z' * 13, 'q'] * 3


@pytest.fixture(autouse=True)
def _no_network(no_network):
  """Every test here must work offline (a TFDS download would hang this machine)."""


def _encode():
  return data.DocumentEncoder(tokenizers.ByteTokenizer())


def _rows(docs, L, seed=0, pi=0, pc=1):
  return list(data.packed_rows(docs, _encode(), L, seed, pi, pc, epochs=1))


def _pieces(rows):
  """(doc targets concatenated in row order) from packed rows, padding dropped."""
  return np.concatenate([r['targets'][r['weights'] > 0] for r in rows])


def test_packing_loses_duplicates_and_reorders_no_token_within_an_epoch():
  rows = _rows(DOCS, L=16, seed=3)
  order = list(grain.MapDataset.range(len(DOCS)).shuffle(seed=3))
  expected = np.concatenate([_encode()(DOCS[i])['targets'] for i in order])
  np.testing.assert_array_equal(_pieces(rows), expected)
  assert all(len(r['inputs']) == 16 for r in rows)


def test_segments_and_positions_restart_per_document():
  for r in _rows(DOCS, L=16):
    seg, pos = r['segment_ids'], r['positions']
    for s in np.unique(seg[seg > 0]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    starts = np.flatnonzero(r['inputs'] == tokenizers.ByteTokenizer.bos_id)
    assert all(pos[starts] == 0)


class _Recording:
  def __init__(self, docs):
    self.docs, self.read = docs, []

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.docs[i]


def test_hosts_read_disjoint_slices_whose_union_is_the_epoch():
  pc, seen, tokens = 3, [], 0
  for pi in range(pc):
    src = _Recording(DOCS)
    tokens += len(_pieces(_rows(src, L=8, seed=1, pi=pi, pc=pc)))
    seen.append(src.read)
  assert sorted(sum(seen, [])) == list(range(len(DOCS)))  # each document read once, by exactly one host
  assert tokens == sum(len(_encode()(d)['targets']) for d in DOCS)


def _config(**data_fields):
  c = config_lib.default_config()
  c.model.max_len = 32
  c.train.batch_size, c.train.eval_batch_size = 4, 4
  for k, v in data_fields.items():
    c.data[k] = v
  return c


@pytest.fixture
def mock_lm1b(monkeypatch):
  """lm1b-shaped random text from tfds.testing.mock_data; the prepared-on-disk checks are bypassed because the
  mock replaces exactly the reading they guard (they are tested on real data in test_sources.py)."""
  monkeypatch.setattr(sources, '_prepared_builder', lambda name, data_dir: None)
  monkeypatch.setattr(sources, '_check_split', lambda builder, split: None)
  with tfds.testing.mock_data(num_examples=64):
    yield _config(
      dataset='lm1b',
      train_split='train',
      eval_split='test',
      rows='packed',
      tokenizer='byte',
      data_dir='/nonexistent/tfds',
    )


def test_packed_batches_from_mocked_lm1b(mock_lm1b):
  d = data.make_data(mock_lm1b, process_index=0, process_count=1)
  b = next(d.train_iter)
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}
  assert all(
    b[k].shape == (4, 32) and b[k].dtype == np.int32 for k in ('inputs', 'targets', 'segment_ids', 'positions')
  )
  assert b['weights'].dtype == np.float32
  assert {k: v.dtype for k, v in b.items()} == d.train_keys  # what the train step compiles for before any read
  eval_targets = sum(e['weights'].sum() for e in d.eval_batches)
  docs = sources.documents(mock_lm1b.data, 'test')
  n_bytes = sum(len(docs[i].encode()) for i in range(len(docs)))
  assert d.eval_bytes_per_token == pytest.approx(n_bytes / eval_targets)  # every eval doc, + one EOS each


def test_resumed_iterator_equals_uninterrupted(mock_lm1b):
  it = data.make_data(mock_lm1b, process_index=0, process_count=1).train_iter
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(7)]
  resumed = data.make_data(mock_lm1b, process_index=0, process_count=1).train_iter
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(7))):
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_packed_row_logits_equal_each_document_alone():
  cfg = model_lib.ModelConfig(vocab_size=259, max_len=16, n_layers=2, n_heads=2, d_model=32)
  m = model_lib.Transformer(cfg)
  params = m.init(jax.random.key(0), np.zeros((1, 16), np.int32))['params']
  row = _rows(['abcdef', 'xyz12', 'hello!!'], L=16, seed=0)[0]
  packed_1xLxV = m.apply({'params': params}, row['inputs'][None], row['positions'][None], row['segment_ids'][None])
  for s in np.unique(row['segment_ids'][row['segment_ids'] > 0]):
    alone = row['inputs'][row['segment_ids'] == s][None]
    alone_1xLxV = m.apply({'params': params}, alone)
    np.testing.assert_allclose(packed_1xLxV[0, row['segment_ids'] == s], alone_1xLxV[0], atol=1e-5)


def test_eval_rows_count_bytes_of_exactly_the_whole_documents_evaluated():
  docs = ['abc', 'héllo', 'xy' * 10, 'k']
  rows, n_bytes = data.packed_eval_rows(docs, _encode(), L=8)
  assert rows['weights'].sum() == sum(len(d.encode()) + 1 for d in docs) and n_bytes == sum(
    len(d.encode()) for d in docs
  )
  cut, cut_bytes = data.packed_eval_rows(docs, _encode(), L=8, max_rows=2)  # 16 slots: docs 0 and 1 fit (4 + 7)
  assert cut['inputs'].shape == (2, 8) and cut_bytes == 3 + len('héllo'.encode())
  assert cut['weights'].sum() == 4 + 7


def test_eval_rows_never_shuffle():
  a, _ = data.packed_eval_rows(DOCS, _encode(), L=8)
  np.testing.assert_array_equal(a['targets'][a['weights'] > 0], np.concatenate([_encode()(d)['targets'] for d in DOCS]))


def test_windows_rows_are_the_char_recipe(shakespeare_dirs):
  manual, data_dir = shakespeare_dirs
  c = _config(manual_dir=manual, data_dir=data_dir)
  d = data.make_data(c, process_index=0, process_count=1)
  b = next(d.train_iter)
  assert set(b) == {'inputs', 'targets'} and b['inputs'].shape == (4, 32)
  assert {k: v.dtype for k, v in b.items()} == d.train_keys
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  assert d.eval_bytes_per_token == 1.0  # Tiny Shakespeare is ASCII: one byte per character


def test_text_files_per_line_are_packed(tmp_path):
  (tmp_path / 'a.txt').write_text('first doc\nsecond doc\n\nthird\n')
  (tmp_path / 'b.txt').write_text('fourth')
  c = _config(
    dataset='text_files',
    train_split=str(tmp_path / '*.txt'),
    eval_split=str(tmp_path / 'b.txt'),
    file_docs='line',
    rows='packed',
    tokenizer='byte',
  )
  c.model.max_len = 8
  d = data.make_data(c, process_index=0, process_count=1)
  assert next(d.train_iter)['inputs'].shape == (4, 8)
  assert d.eval_bytes_per_token == pytest.approx(6 / 7)


def test_unknown_rows_is_an_error(mock_lm1b):
  mock_lm1b.data.rows = 'sliding'
  with pytest.raises(sources.DataError, match='data.rows'):
    data.make_data(mock_lm1b)
