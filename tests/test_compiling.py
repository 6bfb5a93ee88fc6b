"""Compiling: JAX's persistent cache is hit by a second process, lmjax's executable cache skips tracing and
fails safe."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import compiling


_CACHE_PROBE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from lmjax import compiling
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name ==
                                           '/jax/compilation_cache/cache_hits' else None)
    compiling.enable_compilation_cache(sys.argv[1])
    jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
    print('HITS', len(hits))
""")


def test_compilation_cache_is_hit_by_a_second_process(tmp_path):
  def hits():
    out = subprocess.run(
      [sys.executable, '-c', _CACHE_PROBE, str(tmp_path / 'cache')],
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split('HITS')[-1])

  assert hits() == 0  # empty cache: compiled and written
  assert hits() >= 1  # same program in a new process: loaded from the cache


_EXECUTABLE_CACHE_PROBE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from lmjax import compiling
    cache_dir, run = sys.argv[1:]
    compiling.enable_compilation_cache(cache_dir)
    f = lambda x: jnp.sin(x) @ x.T + jnp.cos(x).sum()
    x = jnp.arange(64.0).reshape(8, 8) / 64
    cache = compiling.ExecutableCache(cache_dir, {'run': run})
    got = cache.compile('f', jax.jit(f), (x,))(x)
    assert jnp.array_equal(got, jax.jit(f)(x)), 'the cached executable computes something else'
    print('ORIGIN', cache.origin['f'])
""")


def test_executable_cache_skips_tracing_and_never_stores_what_jax_cache_served(tmp_path):
  """Run 'b' differs from 'a' only in its config: a miss for lmjax's cache, a hit for JAX's (same program). XLA
  cannot re-serialize an executable JAX's cache deserialized -- stored, it would fail at run time -- so 'b' is
  never stored, and a later 'b' still runs."""

  def origin(run):
    out = subprocess.run(
      [sys.executable, '-c', _EXECUTABLE_CACHE_PROBE, str(tmp_path), run],
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split('ORIGIN ')[-1].strip()

  assert [origin(r) for r in ('a', 'a', 'b', 'b')] == ['compiled', 'lmjax cache', "JAX's cache", "JAX's cache"]
  assert len(os.listdir(tmp_path / 'lmjax_executables')) == 1


def test_an_unreadable_cache_entry_is_compiled_again(tmp_path):
  f, x = jax.jit(lambda x: jnp.tanh(x) * 3.0), jnp.arange(5.0)
  compiling.ExecutableCache(str(tmp_path), {'a': 1}).compile('f', f, (x,))
  [entry] = (tmp_path / 'lmjax_executables').iterdir()
  entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash mid-write on a filesystem without rename
  cache = compiling.ExecutableCache(str(tmp_path), {'a': 1})
  np.testing.assert_array_equal(cache.compile('f', f, (x,))(x), jnp.tanh(x) * 3.0)
  assert cache.origin['f'] != 'lmjax cache'


def test_a_cache_that_cannot_be_written_costs_only_the_next_runs_head_start(tmp_path, capsys):
  (tmp_path / 'a_file').write_text('not a directory')
  cache = compiling.ExecutableCache(str(tmp_path / 'a_file'), {})
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(cache.compile('f', jax.jit(lambda x: x * 7.0), (x,))(x), x * 7.0)
  assert 'could not write' in capsys.readouterr().err
