"""Tests for lmjax.checkpoint (tiny arrays; runs in seconds on CPU)."""

import os

import jax

# Resharding tests need 8 devices. This must happen before any JAX op; if a
# conftest/other module already initialised the backend, keep what it set
# (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8) and skip if < 8.
try:
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:
  pass

import flax
import grain
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from lmjax.checkpoint import Checkpointer, CheckpointError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


def make_state(seed=0):
  k = jax.random.key(seed)
  return TrainState(
    step=jnp.asarray(7, jnp.int32),
    params={'dense': {'kernel': jax.random.normal(k, (4, 8)), 'bias': jnp.arange(8, dtype=jnp.bfloat16)}},
    opt_state=((), {'mu': jnp.full((4, 8), 0.5)}, None),
    rng=jax.random.key_data(jax.random.fold_in(k, 1)),
  )


def abstract_of(state, sharding=None):
  sharding = sharding or SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def make_dataset():
  return grain.MapDataset.source(np.arange(40)).shuffle(seed=3).map(lambda x: x * 10).batch(4)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('as_iter_dataset', [True, False])
def test_round_trip_state_and_data_iterator(tmp_path, as_iter_dataset):
  ds = make_dataset()
  ds = ds.to_iter_dataset() if as_iter_dataset else ds
  reference = [b for b in iter(ds)]  # what an uninterrupted run sees
  state, meta = make_state(), {'config': {'d_model': 8}, 'tokenizer': {'vocab_size': 256}}
  host_copy = jax.tree.map(np.asarray, state)

  it = iter(ds)
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(tmp_path)
  assert ckpt.save(3, state, data_iter=it, meta=meta)
  # The save must have snapshotted everything: advancing the iterator and
  # deleting the (e.g. donated) device buffers must not affect the checkpoint.
  next(it)
  for x in jax.tree.leaves(state):
    x.delete()
  ckpt.wait()

  fresh = iter(ds)
  restored = ckpt.restore(3, abstract_of(host_copy), data_iter=fresh)
  assert_trees_equal(restored, host_copy)
  for expected in reference[3:]:
    np.testing.assert_array_equal(next(fresh), expected)
  with pytest.raises(StopIteration):
    next(fresh)
  assert ckpt.read_meta() == meta and ckpt.read_meta(3) == meta
  ckpt.close()


def test_max_to_keep_interval_and_force(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=3, async_save=True)
  state = make_state()
  started = [s for s in range(1, 11) if ckpt.save(s, state)]
  assert started == [3, 6, 9]
  assert ckpt.save(10, state, force=True)
  assert not ckpt.save(10, state, force=True)  # never overwrites an existing step
  ckpt.wait()
  assert ckpt.all_steps() == [9, 10] and ckpt.latest_step() == 10
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['10', '9']
  ckpt.close()


def test_new_checkpointer_sees_latest_step(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    ckpt.save(1, make_state(1), meta={'run': 'a'})
    ckpt.save(2, make_state(2), meta={'run': 'b'})
  # Simulates a process restart: a new object, nothing in memory.
  with Checkpointer(tmp_path) as again:
    assert again.latest_step() == 2 and again.all_steps() == [1, 2]
    assert again.read_meta() == {'run': 'b'}
    expected = make_state(2)
    assert_trees_equal(again.restore(None, abstract_of(expected)), expected)


def test_restore_onto_different_sharding(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (CPU) devices')
  devices = np.array(jax.devices()[:8])
  x = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12)
  saved = {'w': jax.device_put(x, NamedSharding(Mesh(devices, ('data',)), P('data', None)))}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, saved)
    ckpt.wait()
    mesh2 = Mesh(devices.reshape(4, 2), ('fsdp', 'tp'))
    for sharding in [NamedSharding(mesh2, P('tp', 'fsdp')), SingleDeviceSharding(jax.devices()[5])]:
      out = ckpt.restore(0, {'w': jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
      assert out['w'].sharding == sharding
      np.testing.assert_array_equal(np.asarray(out['w']), np.asarray(x))


def test_mismatched_tree_raises_naming_leaves(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state)
    ckpt.wait()
    bad = abstract_of(state)
    bad = bad.replace(
      params={
        'dense': {
          **bad.params['dense'],
          'kernel': jax.ShapeDtypeStruct((4, 16), jnp.float32, sharding=bad.rng.sharding),
        }
      }
    )
    with pytest.raises(CheckpointError, match=r'params/dense/kernel.*\[4, 8\].*\[4, 16\]'):
      ckpt.restore(5, bad)
    with pytest.raises(CheckpointError, match=r'step: in checkpoint, not in abstract_state'):
      ckpt.restore(5, {k: v for k, v in vars(abstract_of(state)).items() if k != 'step'})
    wrong_dtype = abstract_of(state).replace(step=jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(CheckpointError, match=r'step: checkpoint int32\[\] vs abstract_state float32\[\]'):
      ckpt.restore(5, wrong_dtype)


def test_restore_params_reads_step_and_params_only_onto_new_shardings(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 (CPU) devices')
  state = make_state()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state)
    ckpt.wait()
  sharding = NamedSharding(Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'tp')), P(None, 'tp'))
  abstract = abstract_of(state).replace(
    params={
      'dense': {
        'kernel': jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding),
        'bias': jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=SingleDeviceSharding(jax.devices()[3])),
      }
    }
  )
  with Checkpointer(tmp_path) as ckpt:  # a new process's view: nothing saved by this object
    out = ckpt.restore_params(None, abstract)
    assert out.opt_state is None and int(out.step) == 7
    assert_trees_equal(out.params, state.params)
    assert out.params['dense']['kernel'].sharding == sharding
    bad = abstract.replace(
      params={'dense': {**abstract.params['dense'], 'kernel': jax.ShapeDtypeStruct((4, 16), jnp.float32)}}
    )
    with pytest.raises(CheckpointError, match=r'params/dense/kernel.*\[4, 8\].*\[4, 16\]'):
      ckpt.restore_params(5, bad)


def test_missing_step_lists_available(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r'available steps: none'):
      ckpt.read_meta()
    ckpt.save(2, make_state())
    ckpt.save(4, make_state())
    with pytest.raises(CheckpointError, match=r'step 3 .*available steps: \[2, 4\]'):
      ckpt.restore(3, abstract_of(make_state()))
    # Items that were not saved at that step give a CheckpointError too.
    with pytest.raises(CheckpointError, match='data'):
      ckpt.restore(4, abstract_of(make_state()), data_iter=iter(make_dataset()))
    with pytest.raises(CheckpointError, match='meta'):
      ckpt.read_meta(4)


def test_data_iterator_state_is_per_process(tmp_path, monkeypatch):
  """Each process writes and reads its own iterator file (process_{i}-of-{n})."""
  from grain._src.core import sharding as grain_sharding  # what grain's handler asks

  ds = make_dataset().to_iter_dataset()
  it = iter(ds)
  next(it)
  monkeypatch.setattr(grain_sharding, 'get_process_index_and_count', lambda: (1, 2))
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, make_state(), data_iter=it)
    assert (tmp_path / '1' / 'data' / 'process_1-of-2.json').exists()
    monkeypatch.setattr(grain_sharding, 'get_process_index_and_count', lambda: (0, 2))
    with pytest.raises(CheckpointError, match='process_0-of-2'):
      ckpt.restore(1, abstract_of(make_state()), data_iter=iter(ds))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_for_eval_and_resume(
  trained, tmp_path, shakespeare_dirs, cache_dir, capsys
):
  import shutil  # pylint: disable=import-outside-toplevel

  from conftest import ONE_DEVICE, rows, train_tiny  # pylint: disable=import-outside-toplevel
  from test_cli import _zero_fill  # pylint: disable=import-outside-toplevel

  from lmjax import inference  # pylint: disable=import-outside-toplevel

  wd = tmp_path / 'run'
  shutil.copytree(trained, wd)
  _zero_fill(wd / 'checkpoints' / '60' / 'state')
  result = inference.evaluate_run(str(wd), ONE_DEVICE)  # the newest that restores
  assert result['step'] == 30 and 'checkpoint step 60' in capsys.readouterr().err
  with pytest.raises(CheckpointError, match='step 60'):
    inference.load_run(str(wd), ONE_DEVICE, step=60)  # a step asked for by number: exactly that one
  train_tiny(wd, shakespeare_dirs, cache=cache_dir)  # resumes from 30, moves 60 aside, trains to 60 again
  assert 'moved to' in capsys.readouterr().err
  assert (wd / 'checkpoints' / 'damaged' / '60').is_dir()  # never deleted
  assert sorted(s for s in os.listdir(wd / 'checkpoints') if s.isdigit()) == ['30', '60']
  _, _, _, a = inference.load_run(trained, ONE_DEVICE, params_only=False)
  _, _, _, b = inference.load_run(str(wd), ONE_DEVICE, params_only=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # the redone steps equal the uninterrupted run's
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r['step'] for r in rows(wd) if 'train_loss' in r] == [10, 20, 30, 40, 50, 60]
