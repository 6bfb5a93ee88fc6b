"""Sharding specifications: any mesh trains the same model as one device, only the layout changes.

Runs on 8 simulated CPU devices with the tiny model (D=32, 2 layers, vocab 64); compiled steps are cached per
mesh so the whole file compiles each mesh once.
"""

import functools

import jax

try:  # tests/conftest.py does this for the whole suite; alone, this file must do it before JAX starts
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:  # backend already initialised (by conftest or another module): keep what it has
  pass

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax import attention, checkpoint, config as config_lib, model as model_lib, parallel, plan, engine as engine_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (simulated) devices')

MESHES = {  # name -> (data, fsdp, tensor)
  'data8': (8, 1, 1),
  'fsdp8': (1, 8, 1),
  'data4_tensor2': (4, 1, 2),
  'data2_fsdp2_tensor2': (2, 2, 2),
}


def tiny_config(data=1, fsdp=1, tensor=1, *overrides):
  return config_lib.load(
    'configs/tiny.py',
    ['model.vocab_size=64', f'mesh.data={data}', f'mesh.fsdp={fsdp}', f'mesh.tensor={tensor}', *overrides],
  )


@functools.lru_cache(maxsize=None)
def task_on(data, fsdp, tensor) -> engine_lib.Engine:
  """One Engine per mesh: its jitted step compiles once for the whole file. (1, 1, 1) is a single device."""
  config = tiny_config(data, fsdp, tensor)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[: data * fsdp * tensor])
  return engine_lib.Engine(config, mesh)


def batches(n, seed=0):
  """n fixed batches shaped (steps_per_call=1, batch 8, length 32)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, size=(n, 1, 8, 33), dtype=np.int32)
  return [{'inputs': t[..., :-1], 'targets': t[..., 1:]} for t in tokens]


def run_steps(engine, state, batch_list):
  """(state, losses) after one optimizer step per batch."""
  losses = []
  with parallel.activate(engine.mesh):
    for b in batch_list:
      state, m = engine.train_fn(state, parallel.put_batch(b, engine.batch_sharding), engine.dropout_rng)
      losses.append(float(m['train_loss'][-1]))
  return state, losses


@functools.lru_cache(maxsize=None)
def single_device_losses():
  engine = task_on(1, 1, 1)
  return tuple(run_steps(engine, engine.init_state(), batches(3))[1])


@pytest.mark.parametrize('name', list(MESHES))
def test_sharded_train_steps_match_single_device(name):
  engine = task_on(*MESHES[name])
  _, losses = run_steps(engine, engine.init_state(), batches(3))
  np.testing.assert_allclose(losses, single_device_losses(), rtol=2e-5)
  assert losses[-1] < losses[0]  # it is training, not replaying the same number


def packed_batches(n, B=8, L=128, seed=0):
  """n packed batches (steps_per_call=1): documents of random lengths, positions restarting in each."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 64, size=(1, B, L + 1), dtype=np.int32)
    ends = np.sort(rng.integers(1, L, size=(B, 2)), axis=1)  # three documents per row
    slots = np.arange(L)
    seg = (1 + (slots[None] >= ends[:, :1]) + (slots[None] >= ends[:, 1:])).astype(np.int32)
    starts = np.where(seg == 1, 0, np.where(seg == 2, ends[:, :1], ends[:, 1:]))
    out.append(
      {
        'inputs': tokens[..., :-1],
        'targets': tokens[..., 1:],
        'segment_ids': seg[None],
        'positions': (slots[None] - starts)[None].astype(np.int32),
        'weights': np.ones((1, B, L), np.float32),
      }
    )
  return out


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
def test_splash_attention_trains_on_a_mesh_as_xla_attention_does_on_one_device(monkeypatch):
  # The Pallas kernel cannot be partitioned by XLA: it runs per shard (batch over data x fsdp, kv heads over
  # tensor), here in Pallas's interpreter. Packed rows with grouped kv heads, layers scanned and rematerialised as
  # configs/c4.py runs them on TPU; two steps, so gradients count too. Then the same on one device, in the same
  # process: nothing of the first mesh may stick to the kernel.
  specs = []
  shard_map = jax.shard_map
  monkeypatch.setattr(jax, 'shard_map', lambda f, **kw: specs.append(kw['in_specs']) or shard_map(f, **kw))

  def losses(data, fsdp, tensor, impl):
    config = tiny_config(
      data,
      fsdp,
      tensor,
      'model.max_len=128',
      f'model.attention={impl}',
      'model.n_kv_heads=2',
      'model.scan_layers=true',
      'model.remat=save_proj',
      'model.n_layers=1',
      'train.batch_size=4',
    )
    engine = engine_lib.Engine(config, parallel.make_mesh(config.mesh, jax.devices()[: data * fsdp * tensor]))
    return run_steps(engine, engine.init_state(), packed_batches(2, B=4))[1]

  want = losses(1, 1, 1, 'xla')
  np.testing.assert_allclose(losses(2, 2, 2, 'splash'), want, rtol=2e-5)
  # the train step's q (B x L x N x G x K) and k (B x N x T x K): rows over data x fsdp, kv heads over tensor
  rows = ('data', 'fsdp')
  assert (P(rows, None, 'tensor', None, None), P(rows, 'tensor', None, None)) in [s[:2] for s in specs]
  np.testing.assert_allclose(losses(1, 1, 1, 'splash'), want, rtol=2e-5)
  assert want[1] < want[0]


@pytest.mark.filterwarnings("ignore:attention='splash' on cpu")
def test_splash_attention_on_meshes_that_split_some_axes_or_none():
  # One process, several meshes: rows that data does not divide (3 on 2), MQA (its one kv head cannot be split, so
  # tensor splits each group's query heads), and no mesh at all after the others.
  from test_attention import reference_attention

  for B, H, N, shape in ((4, 4, 2, (2, 2, 2)), (4, 4, 2, (4, 1, 2)), (3, 4, 1, (2, 1, 2)), (4, 4, 2, (1, 1, 1))):
    ks = jax.random.split(jax.random.key(B + N), 3)
    q = jax.random.normal(ks[0], (B, 128, H, 8))
    k, v = (jax.random.normal(kk, (B, N, 128, 8)) for kk in ks[1:])
    seg_BxL = jnp.where(jnp.arange(128) < 40 + B, 1, 2)[None].repeat(B, 0).astype(jnp.int32)
    mesh = parallel.make_mesh(dict(zip(parallel.AXES, shape)), jax.devices()[: int(np.prod(shape))])
    attend = functools.partial(attention.attend, impl='splash', causal=True)
    with parallel.activate(mesh):
      got = jax.jit(parallel.traced_with(attend, mesh))(q, k, v, seg_BxL)
    slots = jnp.arange(128)
    want = reference_attention(q, k, v, attention.make_mask(slots, slots, seg_BxL, seg_BxL))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f'mesh {shape}')


def test_parameters_are_laid_out_by_their_logical_names():
  engine = task_on(1, 4, 2)
  params = engine.init_state().params
  specs = {
    ('embed',): ('tensor', 'fsdp'),  # vocab 64 over tensor, d_model over fsdp
    ('block_0', 'attn', 'q_kernel'): ('fsdp', 'tensor', None),  # (D, H, K)
    ('block_0', 'attn', 'o_kernel'): ('tensor', None, 'fsdp'),  # (H, K, D)
    ('block_0', 'mlp', 'up_kernel'): ('fsdp', 'tensor'),  # (D, F)
    ('block_0', 'mlp', 'down_kernel'): ('tensor', 'fsdp'),  # (F, D)
    ('block_0', 'ln1', 'scale'): (None,),
  }
  for path, spec in specs.items():
    x = functools.reduce(lambda t, k: t[k], path, params)
    assert tuple(x.sharding.spec) == spec, path
    want = tuple(d // (engine.mesh.shape[a] if a else 1) for d, a in zip(x.shape, spec))
    assert {s.data.shape for s in x.addressable_shards} == {want}, path


def test_indivisible_dims_stay_replicated():
  # vocab 65 does not divide over tensor=2: the embedding keeps whole rows and shards only d_model over fsdp.
  config = tiny_config(1, 4, 2, 'model.vocab_size=65')
  engine = engine_lib.Engine(config)
  assert tuple(engine.param_shardings['embed'].spec) == (None, 'fsdp')
  assert tuple(engine.param_shardings['block_0']['attn']['q_kernel'].spec) == ('fsdp', 'tensor', None)


def test_fsdp8_device_holds_an_eighth_of_the_train_state():
  # No biases and d_model 64: everything but the norm scales divides by 8, so the replicated remainder is small.
  overrides = ('model.d_model=64', 'model.use_bias=False', 'model.norm=rmsnorm')
  state = engine_lib.Engine(tiny_config(1, 8, 1, *overrides)).init_state()
  device0 = jax.devices()[0]
  on_device0 = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == device0)
  whole = sum(x.nbytes for x in jax.tree.leaves(state))
  assert on_device0 <= 0.135 * whole, (on_device0, whole)


def test_activation_constraints_apply_inside_jit_wherever_it_is_traced():
  engine = task_on(2, 2, 2)
  batch = {
    k: jax.ShapeDtypeStruct(engine.train_batch_shape, np.int32, sharding=engine.batch_sharding)
    for k in ('inputs', 'targets')
  }
  hlo = engine.train_fn.lower(engine.abstract_state, batch, engine.dropout_rng).as_text()  # no activate() around it
  assert 'sharding_constraint' in hlo
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in hlo  # the MLP hidden activations: batch x length x mlp


def test_config_rules_override_the_default_mapping():
  config = tiny_config(1, 4, 2)
  with config.unlocked():
    config.mesh.rules = (('embed', None), ('mlp', ('fsdp', 'tensor')))
  engine = engine_lib.Engine(config)
  assert tuple(engine.param_shardings['block_0']['mlp']['up_kernel'].spec) == (None, ('fsdp', 'tensor'))
  assert tuple(engine.param_shardings['block_0']['attn']['q_kernel'].spec) == (None, 'tensor', None)
  with pytest.raises(config_lib.ConfigError, match='not mesh axes'):
    parallel.make_rules((('embed', 'model'),))


def test_checkpoint_saved_on_fsdp8_resumes_on_other_meshes_with_identical_losses(tmp_path):
  source = task_on(1, 8, 1)
  state, _ = run_steps(source, source.init_state(), batches(2))
  ckpt = checkpoint.Checkpointer(tmp_path / 'ckpt')
  ckpt.save(2, state, force=True)
  ckpt.wait()
  later = batches(2, seed=1)
  _, expected = run_steps(source, state, later)
  for mesh in ((4, 1, 2), (1, 1, 1)):  # data x tensor, and one device (as for sampling)
    target = task_on(*mesh)
    restored = ckpt.restore(2, target.abstract_state)
    assert restored.params['embed'].sharding == target.param_shardings['embed']
    _, losses = run_steps(target, restored, later)
    np.testing.assert_allclose(losses, expected, rtol=2e-5, err_msg=f'mesh {mesh}')
  ckpt.close()


def test_plan_reports_sharded_memory_without_a_dataset():
  config = tiny_config(1, 8, 1)
  p = plan.plan(config)
  assert p['n_params'] == sum(c['total'] for c in p['params'].values())
  assert p['params']['attention']['per_layer'] * 2 == p['params']['attention']['total']
  assert p['flops_per_token'] == model_lib.flops_per_token(config_lib.model_config(config), 32)
  replicated = 4 * p['n_params']  # float32
  assert p['bytes_per_device']['params'] < replicated / 4
  assert p['train_step']['temporaries'] > 0
  assert 'memory per device' in plan.report(p)


def test_a_multi_slice_mesh_lays_the_data_axis_across_slices_and_keeps_fsdp_inside_one():
  devices = jax.devices()[:8]
  mesh = parallel.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1, 'slices': 2}, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}  # the sizes are one slice's; data spans both
  for row, first_half in ((mesh.devices[0], devices[:4]), (mesh.devices[1], devices[4:])):  # CPU: slices in order
    assert set(row.flat) == set(first_half)
  with pytest.raises(config_lib.ConfigError, match='mesh.slices=3: must be >= 1 and divide the 8 devices'):
    parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'slices': 3}, devices)
  with pytest.raises(config_lib.ConfigError, match='a multi-slice mesh uses every device'):
    parallel.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 1, 'slices': 2}, devices)
