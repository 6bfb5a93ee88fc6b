"""`lmjax bench`: the numbers it prints and records are consistent with each other and with the config."""

import json

import numpy as np
import pytest

from lmjax import bench, cli, metrics, workdir


def test_bench_records_a_consistent_result_line(tmp_path, capsys):
  record = tmp_path / 'results.jsonl'
  assert (
    cli.main(
      [
        'bench',
        '--config=configs/tiny.py',
        '--steps=2',
        f'--record={record}',
        '--config.train.compilation_cache_dir=',
        '--config.model.n_layers=1',
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert 'ms/step (median)' in out and 'MFU' in out
  (line,) = record.read_text().splitlines()
  r = json.loads(line)
  assert r['config'] == 'tiny.py' and r['model'].startswith('1L/4H/32d len 32')
  assert r['hardware'] and r['date'] and 'git_commit' in r
  assert r['allocator'].split()[0] in ('glibc', 'jemalloc', 'tcmalloc')  # in-process: whatever pytest runs on
  assert (r['batch'], r['length'], r['steps_per_call'], r['compile_origin']) == (8, 32, 1, 'compiled')
  assert r['ms_per_step'] > 0 and r['compile_s'] > 0
  assert r['tokens_per_s'] == pytest.approx(8 * 32 / (r['ms_per_step'] / 1e3), rel=1e-3)
  # the record rounds MFU to 4 decimals and TFLOP/s to 5: at this model's tiny MFU, a 1e-4 absolute tolerance
  tabled = metrics.peak_flops_per_device(0.0) * 8  # the table's CPU entry times the 8 test devices
  assert r['tabled_peak_gflops'] == pytest.approx(tabled / 1e9)
  assert r['mfu_tabled_peak'] == pytest.approx(1e12 * r['model_tflops'] / tabled, abs=1e-4)
  assert r['mfu_measured_peak'] == pytest.approx(1e12 * r['model_tflops'] / (1e9 * r['matmul_gflops']), abs=1e-4)


@pytest.mark.parametrize(
  'flags, isa', [('fpu sse avx avx2 fma', 'AVX2'), ('fpu avx2 avx512f avx512bw', 'AVX-512'), ('fpu sse2', '')]
)
def test_cpu_isa_names_the_widest_vector_extension(tmp_path, flags, isa):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text(f'processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n')
  assert workdir.cpu_isa(str(cpuinfo)) == isa


def test_cpu_isa_of_an_unreadable_cpuinfo_is_empty(tmp_path):
  assert workdir.cpu_isa(str(tmp_path / 'missing')) == ''


def test_bench_of_a_packed_config_runs_the_program_training_runs():
  from lmjax import config as config_lib, data  # pylint: disable=import-outside-toplevel

  config = config_lib.load('configs/tiny.py', ['data.rows=packed', 'model.n_layers=1', 'train.compilation_cache_dir='])
  runner = bench.Runner(config)
  assert sorted(runner.batch) == sorted(data.TRAIN_KEYS['packed'])
  segments = np.asarray(runner.batch['segment_ids'])[0, 0]
  positions = np.asarray(runner.batch['positions'])[0, 0]
  assert set(segments.tolist()) == {1, 2} and positions[segments == 2][0] == 0  # two documents per row
  assert np.isfinite(runner.result(runner.time(1))['final_loss'])
