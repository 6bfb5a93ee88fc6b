"""The TPU path, compiled ahead of time for TPU slices on this CPU host (libtpu's compile-only devices): the splash
kernel is Mosaic, memory is reported per chip against its HBM, multi-slice meshes compile, and bad input is one
line. Tests that compile need libtpu (`pip install -e '.[tpu]'`) and are skipped without it."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from lmjax import cli, config as config_lib, plan, topology
from lmjax.errors import ConfigError

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None, reason=f'libtpu is not installed: {topology.INSTALL}'
)
# The smallest model whose attention splash takes: sequences of whole 128-token tiles, bf16 like the TPU configs.
TINY_TPU = ['model.attention=auto', 'model.max_len=128', 'model.vocab_size=65', 'model.dtype=bfloat16']


def tiny(*extra):
  return config_lib.load(str(REPO / 'configs' / 'tiny.py'), TINY_TPU + list(extra))


@needs_libtpu
def test_a_tiny_config_compiled_for_a_tpu_slice_holds_the_mosaic_splash_kernel_and_reports_memory_per_chip():
  p = plan.plan(tiny(), topology.devices('v5e-4'))
  assert p['platform'] == 'tpu' and p['n_devices'] == 4 and p['device_kind'] == 'TPU v5 lite'
  assert p['attention'] == 'splash' and p['train_step']['mosaic_calls'] > 0  # not Pallas's interpreter
  s = p['train_step']
  assert p['fits'] and 0 < s['temporaries'] < s['total'] <= p['hbm_bytes'] == topology.CHIPS['v5e'].hbm_bytes
  assert p['eval_step']['total'] > 0 and p['sample_step']['total'] > 0  # the sampler compiled for the slice too
  e = p['estimate']  # the compiler's own: a step time, and the throughput and MFU it implies
  assert e['step_s'] > 0 and e['tokens_per_s'] == pytest.approx(p['tokens_per_step'] / e['step_s'])
  assert 0 < e['mfu'] < 1 and 0.5 < e['flops_counted'] < 1.5
  text = plan.report(p)
  assert "compiler's estimate" in text and 'attention: splash' in text and 'fits, margin' in text


@needs_libtpu
def test_calls_the_cost_model_cannot_cost_are_added_back_so_dropout_still_gets_the_compilers_estimate():
  # On TPU dropout draws with rbg keys, whose X64Combine calls XLA's cost model counts as -1 s each.
  plain = plan.plan(tiny(), topology.devices('v5e-4'), train_only=True)['estimate']['step_s']
  p = plan.plan(tiny('model.dropout=0.1'), topology.devices('v5e-4'), train_only=True)
  s = p['train_step']
  assert s['uncosted_calls'] > 0 and s['optimal_seconds'] < 0  # what XLA's sum gives, uncorrected
  # Dropout's mask is a little work on top of the same step: wrong by a whole second per call, this could not hold.
  assert plain < p['estimate']['step_s'] < 1.5 * plain


@needs_libtpu
def test_windowed_einsum_loops_are_found_and_the_estimate_is_compiled_without_them(monkeypatch):
  # On a 32-chip slice XLA computes an fsdp-sharded matmul's gradient as a loop over result slices, whose body its
  # cost model counts once; compiled with WHOLE_COST_OPTIONS the same gradient is one matmul, costed whole.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = topology.devices('v5p-64')
  rows = NamedSharding(Mesh(np.array(devices), ('fsdp',)), P('fsdp', None))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))), in_shardings=(rows, rows), out_shardings=rows)
  M, K, N = 65536, 4096, 12288
  args = (jax.ShapeDtypeStruct((K, N), jnp.bfloat16), jax.ShapeDtypeStruct((M, K), jnp.bfloat16))
  matmul_flops = 2 * 2 * M * K * N / len(devices)  # the forward product and the weight gradient, per chip
  looped, whole = (grad.lower(*args).compile(compiler_options=o) for o in (None, plan.WHOLE_COST_OPTIONS))
  assert len(plan._WINDOWED.findall(looped.as_text())) > 0 and looped.cost_analysis()['flops'] < matmul_flops / 2
  assert not plan._WINDOWED.findall(whole.as_text())
  assert whole.cost_analysis()['flops'] == pytest.approx(matmul_flops, rel=0.01)
  # A step with such loops is estimated from copies compiled without them.
  options = []

  def copy_plan(c, devices, estimate, train_only, compiler_options=None):
    options.append(compiler_options)
    return {'train_step': {'compiler_seconds': 1e-3 * c.model.n_layers, 'flops': 1e9 * c.model.n_layers}}

  monkeypatch.setattr(plan, 'plan', copy_plan)
  step = {'compiler_seconds': 1e-3, 'flops': 1e9, 'windowed_loops': 6, 'uncosted_calls': 0, 'optimal_seconds': 1e-3}
  p = {'train_step': step, 'tokens_per_step': 4096, 'flops_per_token': 1e6, 'n_devices': 4, 'device_kind': 'TPU v5'}
  e = plan._estimate(tiny(), None, p)
  assert options == [plan.WHOLE_COST_OPTIONS] * 2 and 'without windowed einsums' in e['from']
  assert e['step_s'] == pytest.approx(2e-3) and e['flops_counted'] == pytest.approx(2e9 / (1e6 * 4096 / 4))


@needs_libtpu
def test_two_slices_compile_with_the_data_axis_across_them_and_a_step_that_does_not_fit_is_a_result():
  p = plan.plan(tiny('mesh.slices=2'), topology.devices('v5e-4', slices=2), estimate=False)
  assert p['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1} and p['slices'] == 2 and p['attention'] == 'splash'
  # 2**21 rows of 128 tokens cannot fit a v5e chip's 16 GiB: the compiler's refusal comes back, not a traceback
  big = plan.plan(tiny('train.batch_size=2097152'), topology.devices('v5e-4'))
  assert not big['fits'] and 'RESOURCE_EXHAUSTED' in big['train_step']['oom'] and 'estimate' not in big
  assert 'does not fit' in plan.report(big) and '--fit' in plan.report(big)


def test_accelerator_type_names_map_to_slice_shapes_and_unknown_ones_list_the_known():
  assert topology.libtpu_shape('v5e-16') == 'v5e:4x4' and topology.libtpu_shape('v6e-8') == 'v6e:2x4'
  assert topology.libtpu_shape('v5p-64') == 'v5p:2x4x4'  # v5p and v4 count TensorCores, two per chip
  assert topology.libtpu_shape('v4-32') == 'v4:2x2x4' and topology.libtpu_shape('v5e:2x4') == 'v5e:2x4'
  with pytest.raises(ConfigError, match=r"unknown TPU topology 'v5e-3'; known: .*v5e-16.*v5p-64"):
    topology.libtpu_shape('v5e-3')


def test_bad_topology_and_missing_libtpu_are_one_line_errors(monkeypatch, capsys):
  tiny_config = str(REPO / 'configs' / 'tiny.py')
  assert cli.main(['plan', f'--config={tiny_config}', '--topology=v9z-16']) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "unknown TPU topology 'v9z-16'" in err
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)  # as on a host without libtpu
  assert cli.main(['plan', f'--config={tiny_config}', '--topology=v5e-16']) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "needs libtpu: pip install 'lmjax[tpu]'" in err


def _search(memory_of_batch, budget, start, unit=4, limit=10):
  """plan.fit's search against a memory model instead of compiles: (largest fit, compiles used)."""
  tried = []
  b = start
  while b is not None and len(tried) < limit:
    total = memory_of_batch(b)
    tried.append({'train.batch_size': b, 'fits': total <= budget, 'total': total, 'hbm': budget})
    b = plan._next_batch(tried, unit)
  return max((t['train.batch_size'] for t in tried if t['fits']), default=None), len(tried)


@pytest.mark.parametrize('start', [8, 64, 4096])
def test_the_batch_search_finds_the_largest_batch_within_5_percent_in_a_few_compiles(start):
  line = lambda b: 1_000_000 + 3_000 * b  # bytes per device: state, then activations per row
  best, compiles = _search(line, budget=100_000_000, start=start)
  largest = (100_000_000 - 1_000_000) // 3_000 // 4 * 4
  assert 0.95 * largest <= best <= largest and compiles <= 7
  bent = lambda b: 1_000_000 + 3_000 * b + 0.05 * b * b  # memory that grows faster than the line
  best, compiles = _search(bent, budget=100_000_000, start=start)
  largest = max(b for b in range(4, 40_000, 4) if bent(b) <= 100_000_000)
  assert 0.95 * largest <= best <= largest and compiles <= 8


def test_the_batch_search_halves_until_something_fits_and_says_when_nothing_does():
  assert _search(lambda b: 3_000 * b, budget=100_000, start=1024)[0] == 32
  assert _search(lambda b: 10**9, budget=100_000, start=64) == (None, 5)  # 64, 32, 16, 8, 4: none fits


def test_platform_comes_from_the_mesh_being_traced_not_the_host():
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType

  from lmjax import attention, parallel

  tpu = AbstractDevice(device_kind='TPU v5 lite', num_cores=1, platform='tpu')
  mesh = AbstractMesh((4,), ('data',), axis_types=(AxisType.Auto,), abstract_device=tpu)
  assert parallel.platform() == jax.default_backend()
  with jax.sharding.use_abstract_mesh(mesh):
    assert parallel.platform() == 'tpu'
    assert attention.resolve('auto', 'bfloat16', 0.0, True, 1024) == 'splash'
    assert attention.chunk_for(1024, -1) == 0  # causal chunks are a CPU trade
  assert parallel.platform(parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})) == 'cpu'
