"""The process environment a run needs before Python imports anything heavy: glibc's allocator on huge pages.

XLA on CPU takes every executable call's temporaries from malloc, and buffers over 32 MiB (glibc's largest mmap
threshold) are fresh mmaps that fault in page by page on each call. The 6-layer/384 recipe's step faulted ~1.7M
4 KiB pages; with glibc's `glibc.malloc.hugetlb=1` tunable (transparent huge pages for malloc, glibc >= 2.35, where
the kernel's THP mode is `madvise`) the same run faulted 65k pages in all and its step went from 17.3 to 14.3 s.
A tunable is read once, when the process starts, so `lmjax` re-executes itself with it (same pid, same
arguments), before JAX is imported: the cost is one more interpreter start. LMJAX_NO_REEXEC=1 turns this off.
Nothing here imports JAX.
"""
from __future__ import annotations

import os
import sys

_HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def tuned_environ(environ) -> dict | None:
  """`environ` with the allocator tunable added, or None when there is nothing to do: it is set already, the user
  set glibc.malloc.hugetlb to something else, LMJAX_NO_REEXEC is set, or this is not Linux."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if not sys.platform.startswith('linux') or environ.get('LMJAX_NO_REEXEC') or 'glibc.malloc.hugetlb' in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(t for t in (tunables, _HUGE_PAGES) if t)}


def reexec_tuned(args: list[str]):
  """Replaces this process with `python *args` in the tuned environment (see module docstring); returns only when
  there is nothing to do or the exec failed, and then the run goes on untuned."""
  env = tuned_environ(os.environ)
  if env is None:
    return
  try:
    os.execve(sys.executable, [sys.executable, *args], env)
  except OSError as e:
    print(f'lmjax: could not restart with {_HUGE_PAGES} ({e}); continuing without it', file=sys.stderr)
