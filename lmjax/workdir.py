"""Everything a run directory holds, read and written here and nowhere else.

  WORKDIR/config.json       the resolved config the run used (written only after every check passed)
  WORKDIR/tokenizer.json    the tokenizer's spec (+ tokenizer.model for SentencePiece): a new process reloads it
  WORKDIR/checkpoints/      the last train.keep_checkpoints steps (Orbax: state, data-iterator state, metadata)
  WORKDIR/best/             the best checkpoint by train.keep_best, when set
  WORKDIR/metrics.jsonl     one JSON object per logged step (+ TensorBoard event files)
  WORKDIR/provenance.json   one entry per start of the run: commit, command line, versions, devices, host
  WORKDIR/lock.json         while a run trains: its host, pid and start (Lock)
  WORKDIR/profile/          jax.profiler traces (train.profile_steps; lmjax/profiling.py)

A workdir is addressed as DIR, or DIR:STEP for one checkpoint (DIR:best for the best one).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time

import ml_collections

from lmjax import config as config_lib, files, tokenizers
from lmjax.errors import ConfigError, WorkdirError

CONFIG = 'config.json'
PROVENANCE = 'provenance.json'
METRICS = 'metrics.jsonl'
LOCK = 'lock.json'
PROFILE = 'profile'
CHECKPOINTS = 'checkpoints'
BEST = 'best'
_LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy')


def split_ref(ref: str) -> tuple[str, int | str | None]:
  """'DIR' -> (DIR, None); 'DIR:STEP' -> (DIR, STEP); 'DIR:best' -> (DIR, 'best')."""
  head, sep, tail = ref.rpartition(':')
  if sep and head and (tail.isdigit() or tail == 'best'):
    return head, int(tail) if tail.isdigit() else tail
  return ref, None


def ensure_writable(workdir: str) -> str:
  """Creates the workdir (and parents) and proves it writable, or raises WorkdirError saying what is in the way."""
  if '://' in workdir:  # gs://... on a TPU VM: the storage client reports its own errors
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory; pick another path or move the file')
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'cannot write to --workdir {workdir} ({e.strerror or e}); use a writable directory') from None
  return workdir


def checkpoint_dir(workdir: str, best: bool = False) -> str:
  return os.path.join(workdir, BEST if best else CHECKPOINTS)


def profile_dir(workdir: str) -> str:
  return os.path.join(workdir, PROFILE)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, in order (none when it has none). A torn last line (a run killed while
  writing it, or one being written now) is left out; a damaged line before it is an error."""
  try:
    with open(metrics_path(workdir), encoding='utf-8', errors='replace') as f:  # a bad byte: a line not JSON
      lines = f.readlines()
  except FileNotFoundError:
    return []
  rows = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict):
      rows.append(row)
    elif i < len(lines) - 1:
      raise WorkdirError(f'{metrics_path(workdir)} line {i + 1} is not a JSON object; the file is damaged')
  return rows


def saved_steps(workdir: str) -> list[int]:
  """The steps WORKDIR/checkpoints holds, read from the directory names without opening Orbax: a step's directory
  gets its final name only once its write is complete (it is written under a temporary name first)."""
  try:
    names = os.listdir(checkpoint_dir(workdir))
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir(workdir), n)))


# ---------------------------------------------------------------------------------------------- the lock


class Lock:
  """WORKDIR/lock.json while a training job runs in it: who holds it (host, pid, since when); its mtime is a
  heartbeat the loop renews at every log point. Created with O_EXCL, so of two jobs started together one wins, on
  a local disk or a shared filesystem alike. A lock whose holder is gone is stale and taken over: on this host, a
  pid that no longer runs; from another host, a heartbeat older than `stale_minutes`. Sampling and evaluation
  never take it: they only read."""

  def __init__(self, workdir: str, stale_minutes: float = 15.0):
    self.path, self.stale_minutes = os.path.join(workdir, LOCK), stale_minutes
    self.mine = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'since': datetime.datetime.now().isoformat(timespec='seconds'),
    }
    self.held = False

  def acquire(self):
    for _ in range(3):  # a stale lock removed between our tries: try again
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read()
        if holder is not None and not self._stale(holder):
          raise WorkdirError(
            f'{os.path.dirname(self.path)} is in use by `lmjax train` on host {holder.get("host")}, pid '
            f'{holder.get("pid")}, since {holder.get("since")}; wait for it or stop it, or use another --workdir '
            f'(a lock left by a killed run is taken over by itself; delete {self.path} only if you are sure)'
          ) from None
        try:
          os.remove(self.path)  # stale (or unreadable): its holder is gone
        except FileNotFoundError:
          pass
        continue
      except OSError as e:
        raise WorkdirError(f'cannot create {self.path} ({e.strerror or e}); use a writable --workdir') from None
      with os.fdopen(fd, 'w') as f:
        json.dump(self.mine, f)
      self.held = True
      return self
    raise WorkdirError(
      f'could not take {self.path}: another job keeps creating it; is a second `lmjax train` starting on this workdir?'
    )

  def _read(self) -> dict | None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
      holder['heartbeat'] = os.path.getmtime(self.path)
      return holder
    except (OSError, ValueError):
      return None

  def _stale(self, holder: dict) -> bool:
    if holder.get('host') == self.mine['host']:
      try:
        os.kill(int(holder.get('pid', -1)), 0)
      except ProcessLookupError:
        return True
      except (PermissionError, ValueError, OverflowError):
        return False
      return False
    return time.time() - holder['heartbeat'] > 60 * self.stale_minutes

  def touch(self):
    if self.held:
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self):
    holder = self._read() or {}
    if self.held and (holder.get('host'), holder.get('pid')) == (self.mine['host'], self.mine['pid']):
      try:
        os.remove(self.path)
      except OSError:
        pass
    self.held = False


def may_write(workdir: str, command: str, writes=()) -> None:
  """Raises WorkdirError unless `lmjax COMMAND` may write into `workdir`: no live run holds its lock, and it is
  new, empty, or holds only names COMMAND itself writes (`writes`). Commands that create a workdir call this
  before writing anything."""
  if '://' in workdir or not os.path.isdir(workdir):
    return  # new (or remote, where no lock file is kept): ensure_writable says if it cannot be made
  lock = Lock(workdir)
  holder = lock._read()  # pylint: disable=protected-access
  if holder is not None and not lock._stale(holder):  # pylint: disable=protected-access
    raise WorkdirError(
      f'{workdir} is in use by a run on host {holder.get("host")}, pid {holder.get("pid")}, since '
      f'{holder.get("since")}; `lmjax {command}` would replace what it wrote. Use another --workdir'
    )
  refuse_foreign(workdir, command, writes)


# What a training run writes into its workdir (shell patterns): `lmjax train` refuses a non-empty directory holding
# anything else, so a mistyped --workdir never mixes a run into a folder of other files.
RUN_WRITES = (
  CONFIG,
  PROVENANCE,
  METRICS,
  LOCK,
  PROFILE,
  CHECKPOINTS,
  BEST,
  'tokenizer.json',
  'tokenizer.model',
  'hf_tokenizer.json',
  'chat_template.jinja',
  'spm-*.model',
  'tensorboard',
  'wandb',
  'wandb_run.json',
  '*.tmp',
  '.write_test.*',
)


def refuse_foreign(workdir: str, command: str, writes=()) -> None:
  """Raises WorkdirError when `workdir` holds a name that `lmjax COMMAND` does not write (`writes`: names or shell
  patterns)."""
  if '://' in workdir or not os.path.isdir(workdir):
    return
  foreign = sorted(n for n in os.listdir(workdir) if n != LOCK and not any(fnmatch.fnmatch(n, w) for w in writes))
  if foreign:
    shown = ', '.join(foreign[:4]) + (f' and {len(foreign) - 4} more' if len(foreign) > 4 else '')
    raise WorkdirError(
      f'{workdir} is not empty and holds {shown}, which `lmjax {command}` does not write; use a new or empty --workdir'
    )


# ---------------------------------------------------------------------------------------------- config, tokenizer


def save_config(config, workdir: str) -> str:
  """Writes the resolved config as JSON: what this run actually used."""
  path = os.path.join(workdir, CONFIG)
  _write_json(path, config.to_dict())
  return path


def load_config(workdir: str, overrides=()) -> ml_collections.ConfigDict:
  """The config a workdir's run recorded, on today's defaults, with `a.b=value` overrides applied."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir} does not exist; pass the --workdir of an `lmjax train` run')
  if not os.path.exists(path):
    raise WorkdirError(f'{workdir} holds no {CONFIG}: is it the --workdir of an `lmjax train` run?')
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(
      f"{path} cannot be read ({e}); restore it from the run's logs or start a new --workdir"
    ) from None
  try:
    config = config_lib.from_dict(recorded)
  except (TypeError, AttributeError, ValueError) as e:  # JSON, but not a config's shape (a list, a wrong type)
    raise WorkdirError(f"{path} is not a recorded config ({e}); restore it from the run's logs") from None
  config_lib.apply_overrides(config, overrides)
  return config_lib.validate(config)


def save_tokenizer(tokenizer, workdir: str) -> None:
  tokenizers.save(tokenizer, workdir)


def load_tokenizer(workdir: str):
  """The tokenizer a workdir recorded, or None if it has none yet."""
  return tokenizers.load(workdir)


def record(config, tokenizer, workdir: str, primary: bool, branched_from: dict | None = None) -> None:
  """Writes the resolved config, the tokenizer and a provenance entry (with `branched_from`, the run and step a
  train.branch_from run started from) -- only after every check has passed, so a refused resume never overwrites
  what the workdir recorded. Only the primary process writes."""
  if primary:
    save_tokenizer(tokenizer, workdir)
    save_config(config, workdir)
    extra = {'branched_from': branched_from} if branched_from else {}
    if config.data.get('sources'):  # the stages as this start runs them: a resumed run may change those to come
      weights = {s['name']: s['weight'] for s in config.data.sources}
      extra['data_stages'] = [[0, weights]] + [[int(t), dict(w)] for t, w in config.data.mixture_schedule]
    add_provenance(workdir, extra)


def check_compatible(
  recorded: dict, config, tokenizer_spec: dict | None, where: str, what: str = 'Resume', fields=None
):
  """Raises ConfigError when a checkpoint's model or tokenizer differs from this run's, naming the fields.
  `fields`: the model fields that must agree (default: all but the RUNTIME ones, which a resume may change)."""
  fields = fields if fields is not None else [k for k in config.model if k not in config_lib.fields(config_lib.RUNTIME)]
  # A field added to the model since the checkpoint was written has its default there: the old model had none.
  old = {**dataclasses.asdict(config_lib.ModelConfig()), **recorded['config']['model']}
  new = config.model.to_dict()
  diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if k in fields and old.get(k) != new.get(k)}
  if diff:
    lines = ', '.join(f'model.{k}: checkpoint {a!r} vs run {b!r}' for k, (a, b) in diff.items())
    hint = (
      ' (lmjax.model.stack_layers / unstack_layers convert parameters between the two layouts)'
      if 'scan_layers' in diff
      else ''
    )
    raise ConfigError(
      f'the checkpoint in {where} was trained with a different model ({lines}). {what} with the '
      f'config it was saved with, or start a new --workdir{hint}.'
    )
  if tokenizer_spec is not None and 'tokenizer' in recorded:
    tokenizers.check_same(recorded['tokenizer'], tokenizer_spec, where)


# ---------------------------------------------------------------------------------------------- provenance


def git_state(root: str | None = None) -> dict:
  """{'commit': sha or '', 'dirty': bool} of the checkout lmjax runs from ('' when it is not a git checkout)."""
  root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root, capture_output=True, text=True, timeout=10
    )
  except (OSError, subprocess.SubprocessError):
    return {'commit': '', 'dirty': False}
  if sha.returncode:
    return {'commit': '', 'dirty': False}
  return {'commit': sha.stdout.strip(), 'dirty': bool(dirty.stdout.strip())}


def git_commit() -> str:
  """Short commit, '+dirty' when the tracked tree has changes: the form benchmark records carry."""
  g = git_state()
  return g['commit'][:7] + ('+dirty' if g['dirty'] else '') if g['commit'] else ''


def cpu_isa(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The widest x86 vector extension the CPU reports (Linux), '' when unknown. Recorded with results because hosts
  of one model name differ in it, and CPU kernels depend on it."""
  try:
    with open(cpuinfo) as f:
      flags = next((l.split(':', 1)[1].split() for l in f if l.startswith('flags')), [])
  except OSError:
    return ''
  return next((name for flag, name in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX')) if flag in flags), '')


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The host CPU's model name (Linux), else what `platform` knows."""
  try:
    with open(cpuinfo) as f:
      return next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '') or platform.processor()
  except OSError:
    return platform.processor() or platform.machine()


def hardware() -> str:
  """'CPU model name (N cores, ISA)' on CPU backends, else the JAX device kind and count."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.default_backend() == 'cpu':
    cores = ', '.join(x for x in (f'{os.cpu_count()} cores', cpu_isa()) if x)
    return f'{cpu_model() or "cpu"} ({cores})'
  return f'{jax.device_count()} x {jax.devices()[0].device_kind}'


def provenance() -> dict:
  """What produced a run: the code, the command, the libraries, the devices and the host."""
  import jax  # pylint: disable=import-outside-toplevel

  versions = {}
  for lib in _LIBRARIES:
    try:
      versions[lib] = importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
      versions[lib] = ''
  return {
    'time': datetime.datetime.now().isoformat(timespec='seconds'),
    **{f'git_{k}': v for k, v in git_state().items()},
    'command': ['lmjax' if sys.argv[0].endswith('__main__.py') else os.path.basename(sys.argv[0]), *sys.argv[1:]],
    'python': platform.python_version(),
    'versions': versions,
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'process_count': jax.process_count(),
    'host_cpu': cpu_model(),
    'host_cores': os.cpu_count(),
  }


def add_provenance(workdir: str, extra: dict | None = None) -> dict:
  """Appends this start's provenance (and `extra`) to WORKDIR/provenance.json (a list: a resumed run keeps every
  start)."""
  entries = read_provenance(workdir)
  entry = {**provenance(), **(extra or {})}
  _write_json(os.path.join(workdir, PROVENANCE), entries + [entry])
  return entry


def read_provenance(workdir: str) -> list[dict]:
  path = os.path.join(workdir, PROVENANCE)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      entries = json.load(f)
  except (OSError, ValueError):
    return []
  return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _write_json(path: str, obj) -> None:
  try:
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
  except OSError as e:
    raise WorkdirError(f'cannot write {path} ({e.strerror or e}); free space or use a writable --workdir') from None
