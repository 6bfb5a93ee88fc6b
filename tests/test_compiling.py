"""Compiling: JAX's persistent cache is hit by a second process, lmjax's executable cache skips tracing, never
serves a changed program and fails safe."""

import os
import pickle
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
    cache_dir, run, calls, jax_cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'yes'
    if jax_cache:
      compiling.enable_compilation_cache(cache_dir)
    f = lambda x: jnp.sin(x) @ x.T + jnp.cos(x).sum()
    x = jnp.arange(64.0).reshape(8, 8) / 64
    cache = compiling.ExecutableCache(cache_dir, {'run': run})
    for _ in range(calls):
      got = cache.compile('f', jax.jit(f), (x,))(x)
      assert jnp.array_equal(got, jax.jit(f)(x)), 'the cached executable computes something else'
      print('ORIGIN', cache.origin['f'])
""")


def _origins(cache_dir, run, calls=1, jax_cache=True, stderr=None):
  """The origins of `calls` compiles in a new process; its stderr is appended to the list `stderr` if given."""
  out = subprocess.run(
    [sys.executable, '-c', _EXECUTABLE_CACHE_PROBE, str(cache_dir), run, str(calls), 'yes' if jax_cache else 'no'],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  if stderr is not None:
    stderr.append(out.stderr)
  return [line.split('ORIGIN ')[1] for line in out.stdout.splitlines() if line.startswith('ORIGIN ')]


def test_executable_cache_skips_tracing_and_a_config_change_that_keeps_the_program_is_traced_once(tmp_path):
  """Run 'b' differs from 'a' only in its config, not in its program: traced once (its inputs key is new), served
  the executable 'a' stored, and untraced from then on."""
  origins = [_origins(tmp_path, r)[0] for r in ('a', 'a', 'b', 'b')]
  assert origins == ['compiled', 'lmjax cache', 'lmjax cache, traced', 'lmjax cache']
  entries = sorted(p.suffix for p in (tmp_path / 'lmjax_executables').iterdir())
  assert entries == ['.key', '.key', '.pkl']  # one executable, two inputs keys naming it


def test_what_jax_cache_or_memory_served_is_never_stored(tmp_path):
  """XLA cannot re-serialize an executable JAX's cache deserialized (stored, it would load and then fail at run
  time), and a second compile of the same program in one process returns that same executable from memory."""
  assert _origins(tmp_path, 'a') == ['compiled']
  for entry in (tmp_path / 'lmjax_executables').iterdir():
    entry.unlink()  # JAX's cache still holds the program, lmjax's does not
  assert _origins(tmp_path, 'a', calls=2) == ["JAX's cache", 'in memory']
  assert list((tmp_path / 'lmjax_executables').iterdir()) == []
  assert _origins(tmp_path, 'a') == ["JAX's cache"]  # and the next run still runs


def test_programs_that_lower_to_the_same_text_are_told_apart(tmp_path):
  """jit prunes unused arguments, so 2.75a and 2.75b of (a, b) lower to the same module text; {'a': .} and
  {'b': .} differ only in their result tree. None is served another's executable from lmjax's cache (JAX's cache,
  which the tests share and which handles the pruning itself, may serve the second)."""
  # A shape and a constant no other test compiles keep JAX's persistent cache out of the first.
  a, b = jnp.arange(7.0), jnp.arange(7.0) + 10
  variants = {
    'first': lambda x, y: x * 2.75,
    'second': lambda x, y: y * 2.75,
    'dict a': lambda x, y: {'a': x * 2.75},
    'dict b': lambda x, y: {'b': x * 2.75},
  }
  for name, fn in variants.items():
    cache = compiling.ExecutableCache(str(tmp_path), {'variant': name})
    got = cache.compile('f', jax.jit(fn), (a, b))(a, b)
    assert cache.origin['f'] in ('compiled', "JAX's cache"), (name, cache.origin['f'])
    assert jax.tree.all(jax.tree.map(lambda g, w: bool(jnp.array_equal(g, w)), got, fn(a, b))), name
  cache = compiling.ExecutableCache(str(tmp_path), {'variant': 'first, again'})
  np.testing.assert_array_equal(cache.compile('f', jax.jit(lambda x, y: x * 2.75), (a, b))(a, b), a * 2.75)
  assert cache.origin['f'] == 'lmjax cache, traced'


def test_an_unreadable_cache_entry_is_compiled_again(tmp_path):
  """Without JAX's cache (which would serve the program and keep lmjax's from being written again: a limitation
  docs/performance.md names), a damaged executable is compiled and stored whole again, and a damaged inputs key
  costs one trace."""
  origins = lambda: _origins(tmp_path, 'a', jax_cache=False)
  assert origins() == ['compiled']
  [entry] = (tmp_path / 'lmjax_executables').glob('*.pkl')
  entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash mid-write on a filesystem without rename
  assert origins() == ['compiled']
  assert origins() == ['lmjax cache']
  [alias] = (tmp_path / 'lmjax_executables').glob('*.key')
  alias.write_bytes(b'')
  assert origins() == ['lmjax cache, traced']
  assert origins() == ['lmjax cache']


def test_a_cache_that_cannot_be_written_costs_only_the_next_runs_head_start(tmp_path, capsys):
  (tmp_path / 'a_file').write_text('not a directory')
  cache = compiling.ExecutableCache(str(tmp_path / 'a_file'), {})
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(cache.compile('f', jax.jit(lambda x: x * 7.0), (x,))(x), x * 7.0)
  assert 'could not write' in capsys.readouterr().err


def test_values_are_kept_per_config_and_recomputed_when_unreadable(tmp_path):
  calls = []

  def value(config):
    return compiling.ExecutableCache(str(tmp_path), config).value(
      'shapes', lambda: calls.append(config) or dict(config)
    )

  assert value({'d': 8}) == {'d': 8} and value({'d': 8}) == {'d': 8}
  assert calls == [{'d': 8}]  # the second came from disk
  assert value({'d': 16}) == {'d': 16} and len(calls) == 2  # another config: computed
  for entry in (tmp_path / 'lmjax_executables').glob('*.value'):
    entry.write_bytes(b'\x80')
  assert value({'d': 8}) == {'d': 8} and len(calls) == 3


def _plant(entry, marker, mode=0o600):
  """Replaces a cache entry with a pickle that, once loaded, writes `marker`: any code could stand in its place."""

  class Payload:
    def __reduce__(self):
      return exec, (f'open({str(marker)!r}, "w").write("ran")',)

  entry.write_bytes(pickle.dumps(Payload()))
  entry.chmod(mode)


def test_a_cache_others_can_write_is_never_read(tmp_path):
  """Planted entries never run when another user could have written them: in a directory writable by others
  (neither lmjax's cache nor JAX's is used), or as an entry writable by others or owned by another user (that
  entry is skipped); each run still computes the right result and says why on stderr. The same entry, written
  by this user in a private directory, does run: the cache trusts only this user's own files."""
  cache, marker, stderr = tmp_path / 'cache', tmp_path / 'marker', []
  assert _origins(cache, 'a') == ['compiled']
  [entry] = (cache / 'lmjax_executables').glob('*.pkl')
  _plant(entry, marker)
  cache.chmod(0o777)
  assert _origins(cache, 'a', stderr=stderr) == ['compiled'] and not marker.exists()
  assert 'not using the compilation cache' in stderr[-1] and 'writable by others (mode 777)' in stderr[-1]
  assert len(stderr[-1].strip().splitlines()) == 1  # one warning for both caches
  cache.chmod(0o700)
  entry.chmod(0o666)  # planted while the directory was open
  assert _origins(cache, 'a', jax_cache=False, stderr=stderr) == ['compiled'] and not marker.exists()
  assert 'ignoring cache entry' in stderr[-1]
  if os.getuid() == 0:  # only root can give a file away
    _plant(entry, marker, mode=0o644)
    os.chown(entry, 65534, 65534)
    assert _origins(cache, 'a', jax_cache=False, stderr=stderr) == ['compiled'] and not marker.exists()
    assert 'uid 65534' in stderr[-1]
  _plant(entry, marker)  # this user's own file: loaded, so the payloads above were live
  assert _origins(cache, 'a', jax_cache=False, stderr=stderr) == ['compiled'] and marker.exists()
  assert 'is damaged' in stderr[-1]


def test_values_others_could_have_written_are_computed_again(tmp_path, capsys):
  marker = tmp_path / 'marker'
  value = lambda: compiling.ExecutableCache(str(tmp_path), {'d': 8}).value('shapes', lambda: {'d': 8})
  assert value() == {'d': 8}
  [entry] = (tmp_path / 'lmjax_executables').glob('*.value')
  _plant(entry, marker, mode=0o646)
  assert value() == {'d': 8} and not marker.exists()
  assert 'ignoring cache entry' in capsys.readouterr().err
