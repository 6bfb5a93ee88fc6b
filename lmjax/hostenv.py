"""The process environment a run needs before Python imports anything heavy: glibc's allocator tuned for XLA.

XLA on CPU takes every executable call's temporaries from malloc (several GiB per step for the 6-layer/384 recipe).
By default glibc serves buffers over 32 MiB with fresh mmaps, and frees them back to the kernel at once, so every
call faults its temporaries in again, and on a VM that reports freed memory to its host (Firecracker's
`page_reporting`, this development machine) a step that follows a few idle seconds re-faults them through the host.
Measured on the 6-layer/384 step, 2-core VM, one process each:

  default glibc                                   ~1.7M faults per run, 17.3 s per step
  + hugetlb=1 (transparent huge pages for malloc) ~3,100 faults and 3.5-4 s of kernel time per step, 11.6-12.1 s;
                                                  after 12 s idle: 20 s of kernel time, 21 s per step
  + arena_max=1, mmap_max=0, trim_threshold=1 TiB 0 faults, 0.1 s kernel time, 10.5 s; after 12 s idle: 10.7-11.1 s

The last line keeps every buffer in one sbrk heap that is never trimmed: after the first step the process reuses
its own pages and the resident size stays at the step's peak. Tunables are read once, when the process starts, so
`lmjax` re-executes itself with them (same pid, same arguments) before JAX is imported: the cost is one more
interpreter start. A tunable the user set stands; LMJAX_NO_REEXEC=1 turns this off. Nothing here imports JAX.
"""
from __future__ import annotations

import os
import sys

TUNABLES = (('glibc.malloc.hugetlb', '1'), ('glibc.malloc.arena_max', '1'), ('glibc.malloc.mmap_max', '0'),
            ('glibc.malloc.trim_threshold', str(1 << 40)))


def tuned_environ(environ) -> dict | None:
  """`environ` with the allocator tunables added, or None when there is nothing to do: each is set already (a
  user's own value stands), LMJAX_NO_REEXEC is set, or this is not Linux."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if not sys.platform.startswith('linux') or environ.get('LMJAX_NO_REEXEC'):
    return None
  have = {t.split('=', 1)[0] for t in tunables.split(':') if t}
  missing = [f'{name}={value}' for name, value in TUNABLES if name not in have]
  if not missing:
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join([tunables] * bool(tunables) + missing)}


def tuned_at_start() -> bool:
  """True when this process started with lmjax's heap settings (then nothing may change them at run time)."""
  return 'glibc.malloc.mmap_max' in os.environ.get('GLIBC_TUNABLES', '')


def reexec_tuned(args: list[str]):
  """Replaces this process with `python *args` in the tuned environment (see module docstring); returns only when
  there is nothing to do or the exec failed, and then the run goes on untuned."""
  env = tuned_environ(os.environ)
  if env is None:
    return
  try:
    os.execve(sys.executable, [sys.executable, *args], env)
  except OSError as e:
    print(f'lmjax: could not restart with the allocator tunables ({e}); continuing without them', file=sys.stderr)
