"""The process environment a run needs before Python imports anything heavy: the memory allocator.

XLA on CPU takes every executable call's temporaries from malloc. glibc serves buffers over 32 MiB (its largest mmap
threshold) as fresh mmaps that fault in page by page on every call, and hands freed memory back to the kernel.
Two settings fix that, both read once when a process starts, so `lmjax` re-executes itself with them (same pid,
same arguments) before JAX is imported; the cost is one more interpreter start:

- jemalloc, when installed (Debian/Ubuntu: `apt-get install libjemalloc2`), preloaded with its purging turned off
  (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1): freed temporaries stay mapped in the process and the next call
  reuses them. 6-layer/384 recipe on the 2-core VM: 17.4-18.7 s per step after 12 s idle and ~10.0 s back to back
  with glibc, 9.0-9.9 s either way with jemalloc, at the same resident size (~5.9 GB): this VM reports freed memory
  to its host, and faulting it back after an idle gap cost 15 s of kernel time per step. (glibc kept from trimming,
  the other way to retain memory, fragmented its one heap to 2.6x the resident size.) The price: the process keeps
  its peak heap until it exits, as torch's allocator does.
- glibc's `glibc.malloc.hugetlb=1` (transparent huge pages for malloc, glibc >= 2.35, where the kernel's THP mode is
  `madvise`), which serves whatever glibc still allocates: without jemalloc the 6-layer/384 run faulted 65k pages
  instead of ~1.7M and its step went from 17.3 to 14.3 s.

LMJAX_NO_REEXEC=1 turns all of this off; LMJAX_ALLOCATOR=glibc keeps glibc; a user's own LD_PRELOAD of jemalloc or
tcmalloc, MALLOC_CONF or glibc.malloc.hugetlb setting stands. Nothing here imports JAX.
"""
from __future__ import annotations

import os
import sys

_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
_JEMALLOC_CONF = 'dirty_decay_ms:-1,muzzy_decay_ms:-1'  # never purge: freed pages stay for the next call
_JEMALLOC_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib',
                  '/usr/local/lib')


def find_jemalloc() -> str:
  """Path of an installed libjemalloc.so.2, or ''."""
  return next((p for p in (os.path.join(d, 'libjemalloc.so.2') for d in _JEMALLOC_DIRS) if os.path.exists(p)), '')


def tuned_environ(environ, jemalloc: str | None = None) -> dict | None:
  """`environ` with the allocator settings added, or None when there is nothing to do: they are set already, the
  user set glibc.malloc.hugetlb to something else, LMJAX_NO_REEXEC is set, or this is not Linux.
  `jemalloc`: the library to preload ('' for none); by default, find_jemalloc() unless LMJAX_ALLOCATOR=glibc."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if not sys.platform.startswith('linux') or environ.get('LMJAX_NO_REEXEC') or 'glibc.malloc.hugetlb' in tunables:
    return None
  env = {**environ, 'GLIBC_TUNABLES': ':'.join(t for t in (tunables, _HUGE_PAGES) if t)}
  if jemalloc is None:
    jemalloc = '' if environ.get('LMJAX_ALLOCATOR') == 'glibc' else find_jemalloc()
  preload = environ.get('LD_PRELOAD', '')
  if jemalloc and 'jemalloc' not in preload and 'tcmalloc' not in preload:
    env['LD_PRELOAD'] = ':'.join(p for p in (jemalloc, preload) if p)
    env.setdefault('MALLOC_CONF', _JEMALLOC_CONF)
  return env


def allocator() -> str:
  """The allocator this process runs on, for benchmark records: 'jemalloc (MALLOC_CONF=...)', 'tcmalloc',
  'glibc (hugetlb)' or 'glibc'."""
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
