"""Process-level set-up done once before any JAX work: allocator tuning, multi-host join, compilation cache."""
from __future__ import annotations

import ctypes
import os
import threading
import time

import jax

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_IMPORTED_AT = time.perf_counter()  # seconds_since_process_start's fallback origin


def tune_host_allocator():
  """Keep freed buffers in glibc's heap instead of returning them to the OS.

  On CPU every executable call allocates fresh temporaries; above glibc's default 128 KiB mmap threshold each
  one is an mmap/munmap pair that page-faults on first touch. Raising the thresholds (the same as
  MALLOC_MMAP_THRESHOLD_=32MiB MALLOC_TRIM_THRESHOLD_=2GiB MALLOC_TOP_PAD_=256MiB in the environment) measured
  52.8 -> 43.7 ms per step on the CPU recipe. A no-op where glibc is absent.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return
  libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
  libc.mallopt(_M_TRIM_THRESHOLD, 2 << 30)
  libc.mallopt(_M_TOP_PAD, 256 << 20)


def init_distributed(coordinator: str = '', num_processes: int = 0, process_id: int = -1):
  """Joins the multi-host job. With no arguments: auto-detection (TPU VMs, SLURM, Open MPI) when the environment
  describes a cluster, otherwise a single process. Explicit values are for GPU clusters and local tests."""
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif any(k in os.environ for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                                     'JAX_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()


def enable_compilation_cache(cache_dir: str):
  """JAX's persistent compilation cache: a repeated or resumed run loads its executables instead of compiling."""
  if not cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_once(jitted, *args):
  """Runs a jitted function that executes once (parameter init): compiled without XLA's backend optimisations.

  Random initialisers expand into many threefry hash rounds whose optimised CPU code takes XLA tens of seconds
  to generate for a small model; at -O0 the same program compiles several times faster and runs once anyway.
  """
  return jitted.lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})(*args)


def decode_compiler_options() -> dict:
  """XLA options for token-by-token decoding programs (the sampler's while loop).

  On CPU, XLA hands small dots and their neighbours to YNNPACK as "ynn fusions"; a decode step is a few dozen such
  tiny kernels, and outside them it runs 1.3-1.6x faster (experiments/bench_sample.py, batch 4: medians ~4,600 ->
  ~6,300 tokens/s over several processes). Training steps measured no gain, so only the sampler asks for this.
  Other backends get no options.
  """
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_experimental_ynn_fusion_type': ''}
  return {}


def in_background(fn, *args):
  """Starts fn(*args) on a daemon thread; returns a function that waits for it and returns its result (or raises
  its exception). XLA compiles without holding the GIL, so a compilation started here overlaps with Python and
  device work on the main thread. Daemon: a run that fails before collecting the result exits at once."""
  out = {}

  def target():
    try:
      out['result'] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except  -- re-raised on the caller's thread
      out['error'] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()

  def result():
    thread.join()
    if 'error' in out:
      raise out['error']
    return out['result']
  return result


def seconds_since_process_start() -> float:
  """Wall seconds since this process started (Linux: /proc/self/stat; elsewhere: since this module was
  imported), so start-up figures include the interpreter and the imports, as a user timing the command sees."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, AttributeError):
    return time.perf_counter() - _IMPORTED_AT
