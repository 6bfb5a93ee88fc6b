"""Compiling and starting programs: JAX's persistent compilation cache, lmjax's cache of whole executables, -O0
one-shot programs, the decoder's XLA options, and compiles on a background thread."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import stat
import sys
import threading

import jax
from jax.experimental import serialize_executable

from lmjax import files


def enable_compilation_cache(cache_dir: str):
  """JAX's persistent compilation cache, in CACHE_DIR/jax: a repeated or resumed run loads its executables instead
  of compiling. Its own folder (lmjax's cache is CACHE_DIR/lmjax_executables) because a program JAX's cache holds
  is never stored in lmjax's (see ExecutableCache): entries JAX wrote beside an older lmjax would otherwise keep
  every later run tracing."""
  if not cache_dir:
    return
  jax_dir = os.path.join(os.path.expanduser(cache_dir), 'jax')
  if not trusted_cache_dir(jax_dir):
    return
  jax.config.update('jax_compilation_cache_dir', jax_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class ExecutableCache:
  """Compiled programs on disk, keyed by what decides them, so a repeated run neither traces nor compiles them.

  JAX's persistent cache (above) skips XLA's compile but must still trace and lower the Python function to find
  its key, which costs a warm start more than loading the executable does. This cache keys on the inputs of
  tracing instead: lmjax's source, the library versions, JAX's flags and XLA's environment, the run's resolved
  config, the devices, and the arguments' shapes, dtypes and shardings. A change to any of them is a miss, and the
  function is traced. Each executable is stored once under its program (the lowered module, its argument and
  result trees, the compile arguments), and an inputs key names the program it traced to. So a change that leaves
  the program as it was (an edited comment, a logging interval) is traced once and then served untraced again,
  while a changed program is never served. Unreadable entries and multi-process runs (whose processes compile
  together) compile as usual, and JAX's cache still applies.
  `origin[name]` says where each executable came from (ORIGINS). Entries are code (see trusted_cache_dir): a
  directory or an entry that another user could have written is never read.
  """

  def __init__(self, cache_dir: str, config_dict: dict):
    self.dir = os.path.join(os.path.expanduser(cache_dir), 'lmjax_executables') if cache_dir else ''
    self.enabled = bool(self.dir) and jax.process_count() == 1 and trusted_cache_dir(self.dir)
    self._config = json.dumps(config_dict, sort_keys=True, default=str)
    self.origin = {}  # name -> one of ORIGINS

  def compile(self, name: str, jitted, args: tuple, compiler_options: dict | None = None, key_extra: str = ''):
    """jitted.lower(*args).compile(compiler_options), or the same executable read from the cache. `key_extra`:
    what else decides the program (the static arguments a caller bound into `jitted`)."""
    alias = os.path.join(self.dir, f'{name}-{self._key(name, args, compiler_options, key_extra)}.key')
    if self.enabled:
      compiled = self._load(self._read_alias(alias))
      if compiled is not None:
        self.origin[name] = 'lmjax cache'
        return compiled
    lowered = jitted.lower(*args)
    program = self._program_key(name, lowered, compiler_options) if self.enabled else None
    entry = os.path.join(self.dir, f'{name}-program-{program}.pkl') if program else ''
    compiled = self._load(entry)
    if compiled is not None:
      self.origin[name] = 'lmjax cache, traced'
      self._write(alias, os.path.basename(entry).encode())
      return compiled
    _compile_events.hit = _compile_events.backend = False
    compiled = lowered.compile(compiler_options=compiler_options)
    if _compile_events.hit:
      self.origin[name] = "JAX's cache"
    else:  # no backend compile at all: JAX reused an executable this process already holds
      self.origin[name] = 'compiled' if _compile_events.backend else 'in memory'
    # XLA (CPU, measured) cannot re-serialize an executable it deserialized: the entry would load, then fail at
    # run time with 'Function ... not found'. So only a program XLA has just compiled is stored; one JAX's cache
    # (or this process's memory, which may hold one JAX's cache supplied) served is traced on every run.
    if entry and self.origin[name] == 'compiled':
      # The devices it runs on, in order: by default deserialization would spread it over all of them.
      device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
      if self._write(entry, lambda f: pickle.dump((device_ids, serialize_executable.serialize(compiled)), f)):
        self._write(alias, os.path.basename(entry).encode())
    return compiled

  def value(self, name: str, fn):
    """fn(), or what it returned in an earlier run of the same lmjax source, libraries and config: for the results
    of tracing that are not executables (the abstract train state). Unreadable entries are computed again."""
    if not self.enabled:
      return fn()
    key = hashlib.sha256('\n'.join([_code_fingerprint(), name, self._config]).encode()).hexdigest()[:32]
    path = os.path.join(self.dir, f'{name}-{key}.value')
    content = _read_own_entry(path)
    if content is not None:
      try:
        return pickle.loads(content)  # trusted: only this user could have written it
      except Exception as e:  # pylint: disable=broad-except  -- truncated or stale
        _warn_damaged(path, e)
    out = fn()
    self._write(path, pickle.dumps(out))
    return out

  def _read_alias(self, alias: str) -> str:
    try:
      name = (_read_own_entry(alias) or b'').decode()
    except UnicodeDecodeError:
      return ''
    return os.path.join(self.dir, name) if name.endswith('.pkl') and os.sep not in name else ''

  @staticmethod
  def _load(entry: str):
    content = _read_own_entry(entry) if entry else None
    if content is None:
      return None
    try:  # trusted: only this user could have written it
      device_ids, serialized = pickle.loads(content)
      by_id = {d.id: d for d in jax.devices()}
      return serialize_executable.deserialize_and_load(*serialized, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:  # pylint: disable=broad-except  -- stale or truncated: trace or compile instead
      _warn_damaged(entry, e)
      return None

  def _write(self, path: str, content) -> bool:
    """Writes an entry whole or not at all (`content`: bytes, or a function writing to the open file); a cache
    that cannot be written (disk full, read-only) costs the next run its head start, never this run."""
    try:
      _make_private_dir(self.dir)
      # private: an entry writable by others would be refused when read (_read_own_entry)
      files.write_atomic(path, content, private=True)
      return True
    except Exception as e:  # pylint: disable=broad-except
      print(f'lmjax: could not write {path} ({e}); the next run will compile again', file=sys.stderr)
      return False

  def _key(self, name, args, compiler_options, key_extra='') -> str:
    """The inputs of tracing `name` (see the class docstring)."""
    arg_types = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), str(getattr(x, 'sharding', None))), args)
    parts = [
      _code_fingerprint(),
      name,
      key_extra,
      self._config,
      repr(arg_types),
      str(jax.tree.structure(args)),
      repr(sorted((compiler_options or {}).items())),
      _devices_fingerprint(),
    ]
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:32]

  @staticmethod
  def _program_key(name, lowered, compiler_options) -> str | None:
    """What decides the executable XLA makes of a lowered program, or None when that cannot be told (a JAX whose
    Lowered lacks the compile arguments, host callbacks): then nothing is stored. The module text alone is not
    enough: jit prunes unused arguments, so f(a, b) = 2a and g(a, b) = 2b lower to the same text and differ only
    in which argument they keep."""
    lowering = getattr(lowered, '_lowering', None)  # pylint: disable=protected-access
    compile_args = getattr(lowering, 'compile_args', None)
    if compile_args is None or compile_args.get('host_callbacks') or 'kept_var_idx' not in compile_args:
      return None
    decides = ('kept_var_idx', 'in_shardings', 'out_shardings', 'in_layouts', 'out_layouts')
    parts = [
      _library_fingerprint(placement_flags=False),  # the devices it was compiled for instead:
      repr(getattr(lowering, '_device_list', None)),
      name,
      lowered.as_text(),
      str(lowered.in_tree),
      str(lowered.out_tree),
      repr([(k, sorted(v) if isinstance(v, set) else v) for k, v in sorted(compile_args.items()) if k in decides]),
      repr(compile_args.get('ordered_effects')),
      repr(compile_args.get('unordered_effects')),
      repr(sorted((compiler_options or {}).items())),
      _devices_fingerprint(),
    ]
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:32]


def trusted_cache_dir(cache_dir: str) -> bool:
  """Whether a cache directory can hold only what this user put there; if not, says so once on stderr.

  Cache entries are code: an XLA executable is machine code, and JAX serializes an executable's metadata (its
  argument trees, shardings and shapes) as a pickle, so reading a planted entry runs what its author wrote. No
  file format changes that for an executable cache; what keeps others' code out is that no other user can write
  the entries. So the directory must be owned by this user (or root) and writable by no one else, and so must
  every directory above it, unless it is sticky like /tmp (others can then add entries but not rename ours).
  Each entry is checked again when read (_read_own_entry). A directory that does not exist yet is created first,
  private to this user, so that no one can create it in between."""
  path = os.path.realpath(os.path.expanduser(cache_dir))
  try:
    _make_private_dir(path)
  except OSError:
    pass  # written later or not at all: ExecutableCache._write says so
  why = _why_others_can_write(path)
  if not why:
    return True
  if why not in _warned:  # JAX's cache and lmjax's share a directory and so, mostly, a reason: said once
    _warned.add(why)
    print(
      f'lmjax: warning: not using the compilation cache in {path}: {why}, and cached executables run as code; '
      f'compiling instead (make it yours alone, e.g. chmod 700, or set train.compilation_cache_dir elsewhere)',
      file=sys.stderr,
      flush=True,
    )
  return False


_warned = set()  # the cache directories and entries this process has refused, each said once


def _why_others_can_write(path: str) -> str:
  """'' when only this user or root can change what `path` (an absolute, resolved path) holds; else why not."""
  uid = os.getuid()
  leaf = True
  while True:
    try:
      st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
      st = None  # not there (a write will say why): its parent decides
    except OSError as e:
      return f'it cannot be checked ({e.strerror})'
    if st is not None:
      if st.st_uid not in (uid, 0):
        return f'{path} belongs to another user (uid {st.st_uid})'
      writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
      if writable_by_others and (leaf or not st.st_mode & stat.S_ISVTX):
        return f'{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})'
      leaf = False
    parent = os.path.dirname(path)
    if parent == path:
      return ''
    path = parent


def _make_private_dir(path: str):
  """os.makedirs with the directories it creates readable and writable by this user alone (a umask of 002
  would otherwise make the cache group-writable, and refused on the next run)."""
  parent = os.path.dirname(path)
  if parent and parent != path and not os.path.isdir(parent):
    _make_private_dir(parent)
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass


def _read_own_entry(path: str) -> bytes | None:
  """An entry's bytes, or None when it is absent or could have been written by another user (then said once)."""
  try:
    with open(path, 'rb') as f:
      st = os.fstat(f.fileno())  # of the file opened, whatever a symlink pointed at
      if st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f.read()
  except OSError:
    return None  # absent (the usual miss) or unreadable
  if path not in _warned:
    _warned.add(path)
    print(
      f'lmjax: warning: ignoring cache entry {path}: another user owns it or can write it '
      f'(mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}), and cached executables run as code; compiling instead',
      file=sys.stderr,
      flush=True,
    )
  return None


def _warn_damaged(path: str, e: Exception):
  print(f'lmjax: warning: cache entry {path} is damaged ({type(e).__name__}); compiling again', file=sys.stderr)


ORIGINS = {
  'lmjax cache': 'loaded from the cache',
  'lmjax cache, traced': 'traced, loaded from the cache',
  "JAX's cache": "traced, loaded from JAX's cache",
  'in memory': 'traced, reused from this process',
  'compiled': 'compiled',
}  # where an executable came from, and how commands say it


class _CompileEvents(threading.local):
  hit = False  # JAX's persistent cache supplied this thread's last compile
  backend = False  # the compile reached XLA's backend (a compile or JAX's cache), not an executable held in memory


_compile_events = _CompileEvents()


def _note_jax_cache_hit(event: str, **_):
  if event == '/jax/compilation_cache/cache_hits':  # reported on the compiling thread
    _compile_events.hit = True


def _note_backend_compile(event: str, duration_secs: float, **_):
  if event == '/jax/core/compile/backend_compile_duration':
    _compile_events.backend = True


jax.monitoring.register_event_listener(_note_jax_cache_hit)
jax.monitoring.register_event_duration_secs_listener(_note_backend_compile)


def _devices_fingerprint() -> str:
  return repr([(d.platform, d.device_kind, d.id) for d in jax.devices()]) + jax.devices()[0].client.platform_version


def _library_fingerprint(placement_flags: bool = True) -> str:
  """The libraries that compile a program, the interpreter, JAX's flags and the environment XLA reads.
  `placement_flags=False` leaves out jax_default_device (training sets it, a Python caller need not), for a key
  that names the devices of the lowered program itself."""
  versions = [(pkg, importlib.metadata.version(pkg)) for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')]
  env = sorted((k, v) for k, v in os.environ.items() if k.startswith(('XLA_', 'JAX_', 'LIBTPU')))
  # Where and whether JAX's own cache keeps executables decides nothing in them (and differs between a command
  # that enables it and a Python caller that does not).
  skip = ('compilation_cache', 'persistent_cache') + (() if placement_flags else ('jax_default_device',))
  flags = sorted((k, v) for k, v in jax.config.values.items() if not any(s in k for s in skip))
  return repr((versions, sys.version, env, flags))


def _code_fingerprint() -> str:
  """What decides a traced program besides its config and arguments: lmjax's source and _library_fingerprint."""
  h = hashlib.sha256()
  here = os.path.dirname(os.path.abspath(__file__))
  for name in sorted(os.listdir(here)):
    if name.endswith('.py'):
      with open(os.path.join(here, name), 'rb') as f:
        h.update(name.encode() + f.read())
  h.update(_library_fingerprint().encode())
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
