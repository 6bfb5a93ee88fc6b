"""Compiling and starting programs: JAX's persistent compilation cache, lmjax's cache of whole executables, -O0
one-shot programs, the decoder's XLA options, and compiles on a background thread."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import sys
import threading

import jax
from jax.experimental import serialize_executable


def enable_compilation_cache(cache_dir: str):
  """JAX's persistent compilation cache: a repeated or resumed run loads its executables instead of compiling."""
  if not cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class ExecutableCache:
  """Compiled programs on disk, keyed by what decides them, so a repeated run neither traces nor compiles them.

  JAX's persistent cache (above) skips XLA's compile but must still trace and lower the Python function to find
  its key, which costs a warm start more than loading the executable does. This cache keys on the inputs of
  tracing instead: lmjax's source, the library versions, JAX's flags and XLA's environment, the run's resolved
  config, the devices, and the arguments' shapes, dtypes and shardings. A change to any of them is a miss. Misses,
  unreadable entries and multi-process runs (whose processes compile together) compile as usual, and JAX's cache
  still applies.
  `origin[name]` says which of the three supplied each program. Like JAX's cache, the directory is trusted: its
  entries are loaded as code.
  """

  def __init__(self, cache_dir: str, config_dict: dict):
    self.dir = os.path.join(os.path.expanduser(cache_dir), 'lmjax_executables') if cache_dir else ''
    self.enabled = bool(self.dir) and jax.process_count() == 1
    self._config = json.dumps(config_dict, sort_keys=True, default=str)
    self.origin = {}  # name -> 'lmjax cache' | "JAX's cache" | 'compiled': where each executable came from

  def compile(self, name: str, jitted, args: tuple, compiler_options: dict | None = None, key_extra: str = ''):
    """jitted.lower(*args).compile(compiler_options), or the same executable read from the cache. `key_extra`:
    what else decides the program (the static arguments a caller bound into `jitted`)."""
    key = self._key(name, args, compiler_options, key_extra)
    path = os.path.join(self.dir, f'{name}-{key}.pkl') if self.enabled else ''
    if path:
      try:
        with open(path, 'rb') as f:
          device_ids, serialized = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        compiled = serialize_executable.deserialize_and_load(
          *serialized, execution_devices=[by_id[i] for i in device_ids]
        )
        self.origin[name] = 'lmjax cache'
        return compiled
      except Exception:  # pylint: disable=broad-except  -- absent, stale or truncated: compile it instead
        pass
    _jax_cache_served.hit = False
    compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
    self.origin[name] = "JAX's cache" if _jax_cache_served.hit else 'compiled'
    # XLA (CPU, measured) cannot re-serialize an executable it deserialized: the entry would load, then fail at
    # run time with 'Function ... not found'. So a program JAX's cache already holds (the lmjax source or the
    # config changed, the program did not) is traced on every run, as it was without this cache.
    if path and self.origin[name] == 'compiled':
      self._store(path, compiled)
    return compiled

  def _store(self, path, compiled):
    """Writes the entry whole or not at all; a cache that cannot be written (disk full, read-only) costs the next
    run its head start, never this run."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
      os.makedirs(self.dir, exist_ok=True)
      # The devices it runs on, in order: by default deserialization would spread it over all of them.
      device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
      with open(tmp, 'wb') as f:
        pickle.dump((device_ids, serialize_executable.serialize(compiled)), f)
      os.replace(tmp, path)  # atomic: other processes read the old entry or the new one
    except Exception as e:  # pylint: disable=broad-except
      print(f'lmjax: could not write {path} ({e}); the next run will compile again', file=sys.stderr)
      if os.path.exists(tmp):
        os.remove(tmp)

  def _key(self, name, args, compiler_options, key_extra='') -> str:
    arg_types = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), str(getattr(x, 'sharding', None))), args)
    parts = [
      _code_fingerprint(),
      name,
      key_extra,
      self._config,
      repr(arg_types),
      str(jax.tree.structure(args)),
      repr(sorted((compiler_options or {}).items())),
      repr([(d.platform, d.device_kind, d.id) for d in jax.devices()]),
      jax.devices()[0].client.platform_version,
    ]
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:32]


_jax_cache_served = threading.local()  # .hit: JAX's persistent cache supplied this thread's last compile


def _note_jax_cache_hit(event: str, **_):
  if event == '/jax/compilation_cache/cache_hits':  # reported on the compiling thread
    _jax_cache_served.hit = True


jax.monitoring.register_event_listener(_note_jax_cache_hit)


def _code_fingerprint() -> str:
  """What decides a traced program besides its config and arguments: lmjax's source, the libraries that trace and
  compile it, the interpreter, JAX's flags and the environment XLA reads."""
  h = hashlib.sha256()
  here = os.path.dirname(os.path.abspath(__file__))
  for name in sorted(os.listdir(here)):
    if name.endswith('.py'):
      with open(os.path.join(here, name), 'rb') as f:
        h.update(name.encode() + f.read())
  versions = [(pkg, importlib.metadata.version(pkg)) for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')]
  env = sorted((k, v) for k, v in os.environ.items() if k.startswith(('XLA_', 'JAX_', 'LIBTPU')))
  h.update(repr((versions, sys.version, env, sorted(jax.config.values.items(), key=str))).encode())
  return h.hexdigest()


def run_once(jitted, *args, cache: ExecutableCache | None = None, name: str = ''):
  """Runs a jitted function that executes once (parameter init): compiled without XLA's backend optimisations.

  Random initialisers expand into many threefry hash rounds whose optimised CPU code takes XLA tens of seconds
  to generate for a small model; at -O0 the same program compiles several times faster and runs once anyway.
  With a `cache`, the executable is read from / written to it under `name`.
  """
  options = {'xla_backend_optimization_level': 0}
  if cache is None:
    return jitted.lower(*args).compile(compiler_options=options)(*args)
  return cache.compile(name, jitted, args, options)(*args)


def decode_compiler_options() -> dict:
  """XLA options for token-by-token decoding programs (the sampler's while loop).

  On CPU, XLA hands small dots and their neighbours to YNNPACK as "ynn fusions"; a decode step is a few dozen such
  tiny kernels whose hand-offs cost more than they save, and the decode loop runs faster without them
  (experiments/bench_sample.py measures it). Training steps gain nothing, so only the sampler asks for this.
  Other backends get no options.
  """
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_experimental_ynn_fusion_type': ''}
  return {}


def in_background(fn, *args):
  """Starts fn(*args) on a daemon thread; returns a function that waits for it and returns its result (or raises
  its exception). XLA compiles without holding the GIL, so a compilation started here overlaps with Python and
  device work on the main thread. `result.wait()` only waits: a caller that fails before collecting the result
  calls it, because a process that exits while XLA compiles on another thread aborts (exit 134)."""
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

  result.wait = thread.join
  return result
