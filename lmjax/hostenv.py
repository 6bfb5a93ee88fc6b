"""Process set-up: the memory allocator (before Python imports anything heavy), joining a multi-host job, and the
process clock.

XLA on CPU takes every executable call's temporaries from malloc. glibc serves buffers over 32 MiB (its largest mmap
threshold) as fresh mmaps that fault in page by page on every call, and hands freed memory back to the kernel.
Two settings fix that, both read once when a process starts, so `lmjax` re-executes itself with them (same pid,
same arguments) before JAX is imported; the cost is one more interpreter start. The measurements behind them are
in README.md (Speed, "Host memory").

- jemalloc, when installed (Debian/Ubuntu: `apt-get install libjemalloc2`) and no accelerator is present, preloaded
  with its purging turned off (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1): freed temporaries stay mapped in
  the process and the next call reuses them, at the price of keeping the peak heap until the process exits.
- glibc's `glibc.malloc.hugetlb=1` (transparent huge pages for malloc, glibc >= 2.35, where the kernel's THP mode is
  `madvise`), which serves whatever glibc still allocates.

Opting out: LMJAX_NO_REEXEC=1 changes nothing; LMJAX_ALLOCATOR=glibc keeps glibc; a user's own LD_PRELOAD or
MALLOC_CONF, or glibc.malloc.hugetlb setting, stands. The restarted process carries LMJAX_TUNED=1 (so it never
restarts again), and its children inherit the settings. Nothing here imports JAX.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
import time

_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
_JEMALLOC_CONF = 'dirty_decay_ms:-1,muzzy_decay_ms:-1'  # never purge: freed pages stay for the next call
_TUNED = 'LMJAX_TUNED'
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers
_IMPORTED_AT = time.perf_counter()  # seconds_since_process_start's fallback origin
# Device nodes of GPUs and TPUs: there XLA's temporaries live in device memory, so a no-purge host heap buys
# nothing and would only keep the input pipeline's peak.
_ACCELERATOR_NODES = ('/dev/nvidia0', '/dev/accel0', '/dev/kfd')


def find_jemalloc() -> str:
  """Path of an installed libjemalloc.so.2, or ''."""
  dirs = (f'/usr/lib/{platform.machine()}-linux-gnu', '/usr/lib64', '/usr/lib', '/usr/local/lib')
  return next((p for p in (os.path.join(d, 'libjemalloc.so.2') for d in dirs) if os.path.exists(p)), '')


def _cpu_only(environ) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(os.path.exists(p) for p in _ACCELERATOR_NODES)


def tuned_environ(environ, jemalloc: str | None = None) -> dict | None:
  """`environ` with the allocator settings added and the LMJAX_TUNED marker, or None when there is nothing to do:
  this process is the restarted one, LMJAX_NO_REEXEC is set, or this is not Linux. `jemalloc`: the library to
  preload ('' for none); by default find_jemalloc(), unless LMJAX_ALLOCATOR=glibc or an accelerator is present."""
  if not sys.platform.startswith('linux') or environ.get('LMJAX_NO_REEXEC') or environ.get(_TUNED):
    return None
  env = {**environ, _TUNED: '1'}
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' not in tunables:
    env['GLIBC_TUNABLES'] = ':'.join(t for t in (tunables, _HUGE_PAGES) if t)
  if jemalloc is None:
    wanted = environ.get('LMJAX_ALLOCATOR') != 'glibc' and _cpu_only(environ)
    jemalloc = find_jemalloc() if wanted else ''
  if jemalloc and not environ.get('LD_PRELOAD'):  # a preload of the user's own (ASan, another allocator) stands
    env['LD_PRELOAD'] = jemalloc
    env.setdefault('MALLOC_CONF', _JEMALLOC_CONF)
  return env


def allocator() -> str:
  """The allocator this process runs on, for start-up lines and benchmark records: 'jemalloc (MALLOC_CONF=...)',
  'tcmalloc', 'glibc (hugetlb)', 'glibc', or 'system' off Linux."""
  if not sys.platform.startswith('linux'):
    return 'system'
  try:
    with open('/proc/self/maps') as f:
      maps = f.read()
  except OSError:
    maps = ''
  if 'libjemalloc' in maps:
    return f'jemalloc (MALLOC_CONF={os.environ.get("MALLOC_CONF", "")})'
  if 'libtcmalloc' in maps:
    return 'tcmalloc'
  return 'glibc (hugetlb)' if _HUGE_PAGES in os.environ.get('GLIBC_TUNABLES', '') else 'glibc'


def jemalloc_hint(current: str) -> str:
  """What to tell a CPU user whose run is not on jemalloc, or '' when there is nothing useful to say."""
  if (
    current.startswith(('jemalloc', 'tcmalloc', 'system'))
    or os.environ.get('LMJAX_ALLOCATOR') == 'glibc'
    or os.environ.get('LMJAX_NO_REEXEC')
    or find_jemalloc()
  ):
    return ''
  return ' (larger models step faster on jemalloc: apt-get install libjemalloc2; see lmjax/hostenv.py)'


def reexec_tuned(args: list[str]):
  """Replaces this process with `python *args` in the tuned environment (see module docstring); returns only when
  there is nothing to do or the exec failed, and then the run goes on untuned."""
  env = tuned_environ(os.environ)
  if env is None:
    return
  try:
    os.execve(sys.executable, [sys.executable, *args], env)
  except OSError as e:
    print(f'lmjax: could not restart with a tuned allocator ({e}); continuing without it', file=sys.stderr)


def _meminfo_kib(meminfo: str = '/proc/meminfo') -> dict:
  """/proc/meminfo as {name: KiB} ('MemAvailable:    2000 kB'); {} where it cannot be read."""
  kib = {}
  try:
    with open(meminfo) as f:
      for line in f:
        name, _, rest = line.partition(':')
        fields = rest.split()
        if fields and fields[0].isdigit():
          kib[name] = int(fields[0])
  except OSError:
    return {}
  return kib


def memory_bytes(meminfo: str = '/proc/meminfo', statm: str = '/proc/self/statm') -> int | None:
  """Host memory this process can use, in bytes: what it holds now (resident) plus what the kernel reports available,
  swap included. None off Linux."""
  kib = _meminfo_kib(meminfo)
  try:
    with open(statm) as f:
      resident = int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return None
  if 'MemAvailable' not in kib:
    return None
  return 1024 * (kib['MemAvailable'] + kib.get('SwapFree', 0)) + resident


def available_bytes() -> int:
  """Host memory available to new allocations (the kernel's MemAvailable: free plus reclaimable caches), or the
  free pages where /proc/meminfo cannot tell."""
  kib = _meminfo_kib()
  if 'MemAvailable' in kib:
    return 1024 * kib['MemAvailable']
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def tune_host_allocator():
  """Keep freed buffers in glibc's heap instead of returning them to the OS.

  On CPU every executable call allocates fresh temporaries; above glibc's default 128 KiB mmap threshold each
  one is an mmap/munmap pair that page-faults on first touch. Raising the thresholds (the same as
  MALLOC_MMAP_THRESHOLD_=32MiB MALLOC_TRIM_THRESHOLD_=2GiB MALLOC_TOP_PAD_=256MiB in the environment) keeps
  those buffers mapped between calls (docs/performance.md has the measurements). A no-op where glibc is absent and when lmjax/hostenv.py preloaded
  another allocator (glibc's malloc then serves nothing). Needs no JAX; call it before JAX allocates anything.
  """
  if not allocator().startswith('glibc'):
    return
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return
  libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
  libc.mallopt(_M_TRIM_THRESHOLD, 2 << 30)
  libc.mallopt(_M_TOP_PAD, 256 << 20)


def has_tpu() -> bool:
  """Whether this host has a TPU of its own (a TPU VM's device nodes)."""
  return any(os.path.exists(p) for p in ('/dev/accel0', '/dev/vfio/0'))


def skip_absent_tpu():
  """With libtpu installed (the tpu extra, which `lmjax plan --topology` needs on any host) but no TPU here, JAX
  still tries its TPU backend at the first device query, and libtpu logs five lines of errors about TPU VM metadata
  it cannot find before JAX falls back (JAX skips CUDA where no GPU is visible, but not TPU). Making that backend
  decline at once keeps every command's output to its own lines; the platform stays registered, and compile-only
  topologies load libtpu by themselves (lmjax/topology.py). A JAX_PLATFORMS the user set stands."""
  if os.environ.get('JAX_PLATFORMS') or has_tpu() or importlib.util.find_spec('libtpu') is None:
    return  # (without libtpu JAX is not imported here: commands that never need it stay quick)
  import dataclasses  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel  -- no public way to skip one backend

  registration = getattr(xla_bridge, '_backend_factories', {}).get('tpu')
  if registration is not None and registration.fail_quietly:
    xla_bridge._backend_factories['tpu'] = dataclasses.replace(registration, factory=lambda: None)  # pylint: disable=protected-access


def init_distributed(coordinator: str = '', num_processes: int = 0, process_id: int = -1):
  """Joins the multi-host job. With no arguments: auto-detection (TPU VMs, SLURM, Open MPI) when the environment
  describes a cluster, otherwise a single process. Explicit values are for GPU clusters and local tests."""
  import jax  # pylint: disable=import-outside-toplevel  -- this module stays importable before JAX

  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif _tpu_workers() > 1 or any(
    k in os.environ for k in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')
  ):
    jax.distributed.initialize()


def _tpu_workers() -> int:
  """How many hosts TPU_WORKER_HOSTNAMES names: a TPU VM pod lists every worker; one name (a single-host TPU VM, or
  lmjax.topology's compile-only set-up) is no cluster to join."""
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()])


TIMELINE = 'LMJAX_TIMELINE'  # set (to anything) to print each start-up phase's time to stderr


def mark(phase: str) -> None:
  """With LMJAX_TIMELINE set, prints `lmjax timeline: PHASE 1.23s` (seconds since the process started) to stderr:
  where a command's start-up goes (experiments/bench_startup.py reads these lines). Costs nothing when unset."""
  if os.environ.get(TIMELINE):
    print(f'lmjax timeline: {phase} {seconds_since_process_start():.3f}s', file=sys.stderr, flush=True)


def seconds_since_process_start() -> float:
  """Wall seconds since this process started (Linux: /proc/self/stat; elsewhere: since this module was
  imported), so start-up figures include the interpreter and the imports, as a user timing the command sees."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, AttributeError):
    return time.perf_counter() - _IMPORTED_AT
