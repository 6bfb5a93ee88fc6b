"""Data mixtures (data.sources, data.mixture_schedule, lmjax/mixture.py): one source reads as the lone dataset does,
Parquet and Arrow sources, realised shares, stages that change on resume, bad input, kill -9 and per-source eval."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE, REPO, rows, tiny_overrides, tiny_train_command, train_tiny

from lmjax import config as config_lib, data, inference, mixture, results, sources, workdir
from lmjax.errors import ConfigError, DataError

GREEK = 'αβγδεζηθικλμνξοπρστυφχψω'  # a second corpus sharing no character with Tiny Shakespeare


@pytest.fixture(autouse=True)
def _no_network(no_network):
  """Every test here must work offline (a TFDS download would hang this machine)."""


def _greek_docs(n=400, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(''.join(rng.choice(list(GREEK), rng.integers(2, 9))) for _ in range(30)) + '\n' for _ in range(n)]


@pytest.fixture(scope='module')
def greek_parquet(tmp_path_factory):
  """A Parquet corpus of generated Greek-letter text (train and val files), as `datasets.to_parquet` writes."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  root = tmp_path_factory.mktemp('greek')
  for split, seed in (('train', 0), ('val', 1)):
    docs = _greek_docs(400 if split == 'train' else 40, seed)
    pq.write_table(pa.table({'id': list(range(len(docs))), 'text': docs}), root / f'{split}.parquet')
  return str(root)


def _config(dirs, *extra):
  return config_lib.load('configs/tiny.py', tiny_overrides(*dirs) + list(extra))


def _mix(greek_dir, w_shakespeare=0.7, w_greek=0.3, **greek):
  entries = (
    {'name': 'shakespeare', 'weight': w_shakespeare},
    {
      'name': 'greek',
      'weight': w_greek,
      'dataset': 'parquet',
      'train_split': f'{greek_dir}/train.parquet',
      'eval_split': f'{greek_dir}/val.parquet',
      **greek,
    },
  )
  return f'data.sources={entries!r}'


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------------------------- one source


def test_one_source_reads_exactly_as_the_lone_dataset_windows(shakespeare_dirs):
  lone = data.make_data(_config(shakespeare_dirs), process_index=0, process_count=1)
  one = data.make_data(
    _config(shakespeare_dirs, "data.sources=({'name': 'shakespeare', 'weight': 2.0},)"),
    process_index=0,
    process_count=1,
  )
  assert lone.tokenizer.spec() == one.tokenizer.spec()
  _assert_same_batches(_batches(lone.train_iter, 20), _batches(one.train_iter, 20))
  _assert_same_batches(lone.eval_batches, one.eval_batches)
  assert lone.eval_bytes_per_token == one.eval_bytes_per_token


def test_one_source_reads_exactly_as_the_lone_dataset_packed(tmp_path, shakespeare_dirs):
  for i, doc in enumerate(_greek_docs(30)):
    (tmp_path / f'{i:03d}.txt').write_text(doc)
  files = ['data.dataset=text_files', f'data.train_split={tmp_path}/0*.txt', f'data.eval_split={tmp_path}/02*.txt']
  files += ['data.rows=packed', 'data.tokenizer=byte']
  lone = data.make_data(_config(shakespeare_dirs, *files), process_index=1, process_count=2)
  one = data.make_data(
    _config(shakespeare_dirs, *files, "data.sources=({'name': 'files', 'weight': 1.0},)"),
    process_index=1,
    process_count=2,
  )
  _assert_same_batches(_batches(lone.train_iter, 10), _batches(one.train_iter, 10))
  _assert_same_batches(lone.eval_batches, one.eval_batches)


def test_the_shared_tokenizer_is_trained_on_every_source(shakespeare_dirs, greek_parquet):
  for rows in ('windows', 'packed'):
    d = data.make_data(
      _config(shakespeare_dirs, _mix(greek_parquet), f'data.rows={rows}', 'train.eval_max_batches=0'),
      process_index=0,
      process_count=1,
    )
    assert {'α', 'ω', 'R', 'z'} <= set(d.tokenizer.chars), rows


# ---------------------------------------------------------------------------------------------- tables


def test_parquet_and_arrow_sources_read_the_named_text_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = _greek_docs(5)
  table = pa.table({'label': [0, 1, 0, 1, 1], 'text': docs})
  pq.write_table(table, tmp_path / 'a.parquet')
  saved = tmp_path / 'saved'  # the layout of datasets.save_to_disk: an Arrow stream beside JSON metadata
  saved.mkdir()
  (saved / 'state.json').write_text('{}')
  with pa.ipc.new_stream(str(saved / 'data-00000-of-00001.arrow'), table.schema) as w:
    w.write_table(table)
  for dataset, split in (('parquet', str(tmp_path / '*.parquet')), ('arrow', str(saved))):
    dc = config_lib.default_config().data
    dc.dataset, dc.feature = dataset, 'text'
    got = sources.documents(dc, split)
    assert [got[i] for i in range(len(got))] == docs
  dc.feature = 'body'
  with pytest.raises(DataError, match=r"has no column 'body' \(its columns: label, text\)"):
    sources.documents(dc, str(saved))


# ---------------------------------------------------------------------------------------------- shares


def _greek_rows(batch, tokenizer) -> np.ndarray:
  """Which rows of a batch are Greek text: a row of it holds letters Tiny Shakespeare never has (char ids are the
  sorted characters, so those are the highest), a Shakespeare row none."""
  return batch['inputs'].max(axis=1) >= min(tokenizer.encode(GREEK))


@pytest.mark.parametrize('process_count', [1, 2])
def test_realised_token_shares_are_within_1_percent_of_the_weights_over_1000_steps(
  process_count, shakespeare_dirs, greek_parquet
):
  config = _config(shakespeare_dirs, _mix(greek_parquet))
  greek = 0
  for pi in range(process_count):
    d = data.make_data(config, process_index=pi, process_count=process_count)
    for _ in range(1000):
      batch = next(d.train_iter)
      assert len(batch['inputs']) == config.train.batch_size // process_count
      greek += int(_greek_rows(batch, d.tokenizer).sum())
  share = greek / (1000 * config.train.batch_size)  # every row is max_len tokens of one source
  assert abs(share - 0.3) < 0.01, share


def test_each_process_reads_only_its_share_of_every_source(shakespeare_dirs, greek_parquet, monkeypatch):
  entries = tuple(
    {'name': name, 'weight': 1.0, 'dataset': 'parquet', 'train_split': f'{greek_parquet}/{file}', 'eval_split': ev}
    for name, file, ev in (('a', 'train.parquet', f'{greek_parquet}/val.parquet'), ('b', 'val.parquet', ''))
  )
  packed = ['data.rows=packed', 'data.tokenizer=byte', 'data.read_threads=0']  # no read-ahead: reads are this loop's
  config = _config(shakespeare_dirs, f'data.sources={entries!r}', *packed)
  read, getitem = [], sources.TableFiles.__getitem__
  monkeypatch.setattr(
    sources.TableFiles, '__getitem__', lambda self, i: read.append((self.paths[0].name, int(i))) or getitem(self, i)
  )
  seen = []
  for pi in range(2):
    d = data.make_data(config, process_index=pi, process_count=2)
    read.clear()  # the eval documents were read while making the data; from here on, training reads
    _batches(d.train_iter, 30)
    seen.append(set(read))
  for name in ('train.parquet', 'val.parquet'):
    mine, theirs = ({i for f, i in s if f == name} for s in seen)
    assert mine and theirs and not mine & theirs, name


def test_the_processes_of_a_job_split_every_global_batch_of_sources_between_them():
  stage_list = [(0, np.array([0.6, 0.3, 0.1])), (3, np.array([0.0, 0.5, 0.5]))]
  it = lambda pi, pc: mixture.MixtureIterator('abc', [iter([])] * 3, stage_list, 7, 1536, pi, pc)
  for t in (0, 2, 3, 4):  # batches of 1536 rows cross blocks of 1024, and a stage starts at 3
    whole = it(0, 1).sources_of_batch(t)
    np.testing.assert_array_equal(np.concatenate([it(pi, 4).sources_of_batch(t) for pi in range(4)]), whole)
  assert not (it(0, 1).sources_of_batch(4) == 0).any()


def test_block_sources_hold_each_share_exactly_and_depend_on_the_seed():
  w = np.array([0.5, 0.25, 0.125, 0.125])
  a = mixture.block_sources(w, 0, 0, 0)
  np.testing.assert_array_equal(np.bincount(a, minlength=4), w * mixture.BLOCK)
  assert not np.array_equal(a, mixture.block_sources(w, 1, 0, 0))
  assert not np.array_equal(a, mixture.block_sources(w, 0, 0, 1))
  np.testing.assert_array_equal(a, mixture.block_sources(w, 0, 0, 0))


# ---------------------------------------------------------------------------------------------- stages


def test_a_resumed_mixture_may_change_future_stages_and_the_batches_before_them_stay_the_same(
  shakespeare_dirs, greek_parquet
):
  first = _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((200, {'greek': 1.0}),)")
  whole = data.make_data(first, process_index=0, process_count=1)
  greek = lambda batches: [_greek_rows(b, whole.tokenizer).mean() for b in batches]
  before = _batches(whole.train_iter, 100)
  saved = whole.train_iter.get_state()  # a checkpoint at step 100
  want = _batches(whole.train_iter, 200)  # steps 100 .. 299
  assert 0 < np.mean(greek(before)) < 1 and set(greek(want[100:])) == {1.0}  # the planned stage: only Greek

  # Resumed at step 100, the stage at 200 changed: only Shakespeare from there.
  changed = _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((200, {'shakespeare': 1.0}),)")
  mixture.check_resume(json.loads(json.dumps(first.data.to_dict())), changed.data, 100)  # not begun: allowed
  resumed = data.make_data(changed, process_index=0, process_count=1)
  resumed.train_iter.set_state(saved)
  got = _batches(resumed.train_iter, 200)
  _assert_same_batches(want[:100], got[:100])  # steps 100 .. 199, before the change: exactly as planned
  assert set(greek(got[100:])) == {0.0}


def test_a_stage_at_step_0_replaces_the_sources_own_weights(shakespeare_dirs, greek_parquet):
  d = data.make_data(
    _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((0, {'greek': 1.0}),)"),
    process_index=0,
    process_count=1,
  )
  assert all(_greek_rows(b, d.tokenizer).all() for b in _batches(d.train_iter, 20))


def test_a_resume_refuses_a_change_to_a_stage_that_has_begun(shakespeare_dirs, greek_parquet):
  recorded = json.loads(json.dumps(_config(shakespeare_dirs, _mix(greek_parquet)).data.to_dict()))
  staged = _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((40, {'greek': 1.0}),)")
  mixture.check_resume(recorded, staged.data, 40)  # a stage from the step it resumes at: the future
  with pytest.raises(ConfigError, match='began before step 41'):
    mixture.check_resume(recorded, staged.data, 41)
  reweighted = _config(shakespeare_dirs, _mix(greek_parquet, 0.5, 0.5))  # the first stage, from step 0
  mixture.check_resume(recorded, reweighted.data, 0)
  with pytest.raises(ConfigError, match='began before step 1'):
    mixture.check_resume(recorded, reweighted.data, 1)
  renamed = _config(shakespeare_dirs, _mix(greek_parquet, name='greek2'))
  with pytest.raises(ConfigError, match='keeps its sources'):
    mixture.check_resume(recorded, renamed.data, 41)


# ---------------------------------------------------------------------------------------------- bad input


def test_each_bad_mixture_is_one_user_error_before_any_data_is_read(shakespeare_dirs, greek_parquet, tmp_path):
  greek = f"'dataset': 'parquet', 'train_split': '{greek_parquet}/train.parquet', 'eval_split': ''"
  bad_config = {
    "({'name': 'a', 'weight': -1.0}, {'name': 'b', 'weight': 1.0})": 'weights must be numbers >= 0',
    "({'name': 'a', 'weight': 0.0}, {'name': 'b', 'weight': 0})": 'the weights are all zero',
    f"({{'name': 'a', 'weight': 1.0}}, {{'name': 'b', 'weight': 1.0, 'tokenizer': 'byte', {greek}}})": (
      "has tokenizer='byte' but data.tokenizer is 'char': the sources of a mixture share one tokenizer"
    ),
  }
  for entries, message in bad_config.items():
    with pytest.raises(ConfigError, match=message):
      _config(shakespeare_dirs, f'data.sources={entries}')
  with pytest.raises(ConfigError, match='stage steps must be >= 0 and increasing; 5 follows 10'):
    _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((10, {'greek': 1}), (5, {'greek': 2}))")
  with pytest.raises(ConfigError, match=r"stage at step 10 names unknown sources \['web'\]"):
    _config(shakespeare_dirs, _mix(greek_parquet), "data.mixture_schedule=((10, {'web': 1.0}),)")
  bad_data = {
    _mix(greek_parquet, train_split=str(tmp_path / 'none*.parquet')): "data.sources 'greek': no files match",
    _mix(greek_parquet, feature='body'): "data.sources 'greek': .*train.parquet has no column 'body'",
  }
  for override, message in bad_data.items():
    with pytest.raises(DataError, match=message):
      data.make_data(_config(shakespeare_dirs, override), process_index=0, process_count=1)


def test_a_parquet_file_without_the_field_is_one_line_with_exit_2_before_training(
  tmp_path, shakespeare_dirs, greek_parquet
):
  wd = tmp_path / 'run'
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + [_mix(greek_parquet, feature='body')]
  proc = subprocess.run(
    tiny_train_command(wd, overrides),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  [line] = [l for l in proc.stderr.splitlines() if l.startswith('lmjax train: error: ')]
  assert "data.sources 'greek'" in line and "no column 'body'" in line
  assert not (wd / 'checkpoints').exists()


# ---------------------------------------------------------------------------------------------- training


MIX_RUN = ['train.steps=60', 'train.checkpoint_every=10', 'train.eval_every=30', 'train.log_every=10']


def test_kill_9_then_the_same_command_equals_the_uninterrupted_mixture_run_with_per_source_eval(
  tmp_path, shakespeare_dirs, greek_parquet, cache_dir
):
  mix = [_mix(greek_parquet), "data.mixture_schedule=((20, {'shakespeare': 0.2, 'greek': 0.8}),)", *MIX_RUN]
  train_tiny(tmp_path / 'whole', shakespeare_dirs, *mix, cache=cache_dir)
  wd = tmp_path / 'killed'
  overrides = tiny_overrides(*shakespeare_dirs) + ONE_DEVICE + mix + [f'train.compilation_cache_dir={cache_dir}']
  proc = subprocess.Popen(
    tiny_train_command(wd, overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.time() + 240
    while not (wd / 'checkpoints' / '20').exists() and proc.poll() is None:  # past the stage change
      assert time.time() < deadline, 'no checkpoint at step 20'
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert not (wd / 'checkpoints' / '60').exists(), 'the kill landed after the run finished'
  saved = json.loads((wd / 'checkpoints' / '20' / 'data' / 'process_0-of-1.json').read_text())
  assert saved['batch'] == 20 and set(saved['sources']) == {'shakespeare', 'greek'}
  train_tiny(wd, shakespeare_dirs, *mix, cache=cache_dir)
  _, _, _, want = inference.load_run(str(tmp_path / 'whole'), ONE_DEVICE, params_only=False)
  _, _, _, got = inference.load_run(str(wd), ONE_DEVICE, params_only=False)
  assert int(got.step) == 60
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  skip = ('time', 'tokens_per_sec', 'mfu', 'ms_per_step')
  strip = lambda d: {r['step']: {k: v for k, v in r.items() if k not in skip} for r in rows(d)}
  whole, resumed = strip(tmp_path / 'whole'), strip(wd)
  assert resumed == whole
  last = whole[60]
  for metric in ('val_loss', 'val_bpb'):  # the pooled eval lies between the sources' own
    lo, hi = sorted((last[f'{metric}/shakespeare'], last[f'{metric}/greek']))
    assert lo < last[metric] < hi
  evaluated = inference.evaluate_run(str(tmp_path / 'whole'), ONE_DEVICE)  # `lmjax eval`: the same numbers
  for k in ('val_loss', 'val_loss/shakespeare', 'val_loss/greek', 'val_bpb/greek'):
    assert evaluated[k] == pytest.approx(last[k], rel=1e-6)
  stages = [e['data_stages'] for e in workdir.read_provenance(str(tmp_path / 'whole'))]
  assert stages == [[[0, {'shakespeare': 0.7, 'greek': 0.3}], [20, {'shakespeare': 0.2, 'greek': 0.8}]]]
  run = results.read_run(str(tmp_path / 'whole'))
  table = results.Table({'mix': [run]}, 'mix', ('val_loss',), 0.05, run.config)
  assert table.columns['val_bpb/greek'] == ('final val_bpb greek', -1, '.4f')
