"""Checkpointing: train state + Grain iterator state + JSON metadata, per step.

A thin wrapper over Orbax's CheckpointManager. Each step directory holds three
items:
 state/  the train-state pytree (StandardCheckpointHandler; sharded arrays are
     written by every process, each writing the shards it owns);
 data/   the Grain iterator state, one JSON file per process
     (``process_{i}-of-{n}.json``, grain's own Orbax handler), so every
     host resumes its own slice of the input pipeline;
 meta/   a JSON dict (resolved config, tokenizer description) that callers can
     read cheaply to check compatibility before restoring any arrays.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm
from lmjax.errors import CheckpointError, one_line


def _grain_checkpoint():
  """grain.checkpoint: its Orbax handler and save/restore arguments for the data iterator."""
  import grain.checkpoint  # pylint: disable=import-outside-toplevel  -- only training saves and restores iterators

  return grain.checkpoint


def _drop_orbax_info(record: logging.LogRecord) -> bool:
  # Orbax logs ~70 INFO lines per save/restore through absl's "absl" Python
  # logger; they flood any app that logs at INFO. Keep its warnings/errors,
  # except the one a reader without the iterator's handler gets for every
  # checkpoint holding one (Checkpointer(data_iterator=False)).
  if f'{os.sep}orbax{os.sep}' not in record.pathname:
    return True
  return record.levelno >= logging.WARNING and not str(record.msg).startswith('Item "%s" was found in the checkpoint')


logging.getLogger('absl').addFilter(_drop_orbax_info)


_DISK_FULL = ('RESOURCE_EXHAUSTED', 'No space left on device')


def _drop_disk_full_reports(record: logging.LogRecord) -> bool:
  # A full disk during an async save is logged, with tracebacks, by Orbax's background threads (absl) and by
  # asyncio ("Task exception was never retrieved") before the failure reaches the next save or wait, where
  # Checkpointer raises it as one line. Those copies of the same error are dropped; everything else passes.
  text = record.getMessage() if record.args else str(record.msg)
  if record.exc_info and record.exc_info[1] is not None:
    text += str(record.exc_info[1])
  return not any(k in text for k in _DISK_FULL)


for _name in ('absl', 'asyncio'):
  logging.getLogger(_name).addFilter(_drop_disk_full_reports)


def _free_bytes(directory: str) -> int | None:
  """Free bytes on the disk that holds (or will hold) `directory`; None for remote or unreadable paths."""
  if '://' in directory:
    return None
  while directory and not os.path.exists(directory):  # the first save's directory does not exist yet
    directory = os.path.dirname(directory)
  try:
    return shutil.disk_usage(directory or '.').free
  except OSError:
    return None


def _size(n: int | None) -> str:
  if n is None:
    return '?'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def _free(directory: str) -> str:
  """Free space on the disk holding `directory`, for messages ('?' for remote or unreadable paths)."""
  return _size(_free_bytes(directory))


def _disk_bytes_under(path: str) -> int:
  """What the files under `path` take on disk: whole blocks, which for a checkpoint's many small files is more than
  their sizes."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def _path_str(path) -> str:
  """Key path -> 'params/dense/kernel', the same for dataclass fields and dicts.

  Orbax stores custom nodes (flax.struct.dataclass, optax states) as nested
  dicts/lists, so GetAttrKey('params') and DictKey('params') must compare equal.
  """
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _is_array_like(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _flat(tree) -> dict[str, object]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
  return {_path_str(p): leaf for p, leaf in leaves}


class Checkpointer:
  """Saves/restores (train state, data iterator state, metadata) by step.

  Every process must call save/restore (Orbax synchronises hosts internally).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    data_iterator: bool = True,
  ):
    """`data_iterator=False`: a reader of parameters and metadata (sampling, evaluation, init_from), which never
    imports Grain for the iterator's handler."""
    directory = os.fspath(directory)
    # Resolve relative paths now (a later chdir must not move checkpoints);
    # leave URLs (gs://...) alone.
    self.directory = directory if '://' in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      # Orbax's default policy also saves the *first* step seen, whatever
      # its number; we want "due" to mean exactly step % interval == 0
      # (plus a save when JAX signals preemption, which is what you want).
      save_decision_policy=ocm.AnySavePolicy(
        [
          ocm.FixedIntervalPolicy(save_interval_steps),
          ocm.PreemptionCheckpointingPolicy(),
        ]
      ),
    )
    # Handlers are registered up front so that a fresh manager (new process)
    # can read item metadata / restore items it has never saved itself.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    if data_iterator:
      handlers['data'] = _grain_checkpoint().CheckpointHandler()
    self._mngr = ocp.CheckpointManager(
      self.directory, options=options, item_names=tuple(handlers), item_handlers=handlers
    )
    self._writing = None  # the step of the last save started: an async failure surfaces at the next save or wait
    self._failed = False  # a write failed and was raised as a CheckpointError

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state, *, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due per save_interval_steps or
    force=True. Returns whether a save started.

    On return, the arrays have already been copied to host memory and the
    iterator state captured, so the caller may donate/mutate `state` and
    keep advancing `data_iter` while the files are written in background.
    """
    step = int(step)
    if step in self._mngr.all_steps():
      return False  # never overwrite (Orbax would raise)
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = _grain_checkpoint().CheckpointSave(data_iter)
    if meta is not None:
      items['meta'] = ocp.args.JsonSave(meta)
    try:  # the previous save's background writes first: a disk that filled meanwhile is that step's failure
      self._mngr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._write_error(self._writing, e) from e
    self._check_room(step, state)
    try:
      started = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except (OSError, ValueError, RuntimeError) as e:
      raise self._write_error(step, e) from e
    self._writing = step if started else self._writing
    return started

  def _check_room(self, step: int, state) -> None:
    """Refuses a save the disk cannot hold before any file is written. A write that runs out of space fails inside
    Orbax's background thread, whose other writes then print tracebacks as they land on its closed event loop; the
    disk space of the newest saved step (or the arrays' size, for the first), with a quarter more because steps
    differ in size (compressed chunks, metadata), is the expected need."""
    steps = self.all_steps()
    if steps:
      need = _disk_bytes_under(os.path.join(self.directory, str(steps[-1])))
    else:
      need = sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, 'nbytes'))
    need += need // 4
    free = _free_bytes(self.directory)
    if free is not None and free < need:
      raise self._write_error(step, OSError(28, 'No space left on device'), need)

  def _write_error(self, step, e, need: int | None = None) -> CheckpointError:
    """A failed write (a full disk, a read-only or vanished directory) as one line saying where and what to do."""
    self._failed = True
    text = one_line(e)
    if 'RESOURCE_EXHAUSTED' in text or 'No space' in text or getattr(e, 'errno', None) == 28:
      needs = f', the step needs about {_size(need)}' if need else ''
      why = f'the disk is full ({_free(self.directory)} free there{needs}); lower train.keep_checkpoints or use a --workdir on a larger disk'
    elif 'PERMISSION_DENIED' in text or 'Read-only' in text or getattr(e, 'errno', None) in (13, 30):
      why = 'the directory is not writable'
    else:
      why = text[:300]
    return CheckpointError(
      f'saving the checkpoint of step {step} to {self.directory} failed: {why}. Free space or '
      'fix the permissions there, then run the same command again: it resumes from the last '
      'complete checkpoint'
    )

  def _resolve(self, step: int | None) -> int:
    """Checks `step` exists (latest if None); waits for pending saves first."""
    self.wait()
    steps = self.all_steps()
    if step is None and steps:
      return steps[-1]
    if step is None or int(step) not in steps:
      want = 'any step' if step is None else f'step {step}'
      raise CheckpointError(f'No checkpoint for {want} in {self.directory}; available steps: {steps or "none"}.')
    return int(step)

  def read_meta(self, step: int | None = None) -> dict:
    """Returns the metadata dict saved at `step` (latest if None); no arrays."""
    step = self._resolve(step)
    return dict(self._restore_items(step, meta=ocp.args.JsonRestore())['meta'] or {})

  def _restore_items(self, step: int, **items):
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(**items))
    except (KeyError, ValueError, OSError) as e:
      # e.g. an item was never saved at this step (KeyError), damaged array
      # files (tensorstore's DATA_LOSS / OUT_OF_RANGE come as ValueError), or
      # a checkpoint written by a different number of processes.
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      raise CheckpointError(f'Restoring step {step} from {self.directory} failed: {msg}') from e

  def _check_tree(self, step: int, abstract_state, partial: bool = False) -> None:
    """Compares abstract_state against the stored array metadata (cheap: no
    array data is read) so mismatches give a readable error, not an Orbax crash.
    `partial`: abstract_state is a dict of some top-level entries; only those are compared."""
    try:
      stored = self._mngr.item_metadata(step)['state']
    except (KeyError, ValueError, OSError) as e:  # a zero-filled or truncated metadata file, a missing item
      raise CheckpointError(
        f'Checkpoint step {step} in {self.directory} is damaged or incomplete '
        f'({one_line(e)[:200]}); restore an older step with --step, or delete '
        f'{os.path.join(self.directory, str(step))} to resume from the one before it'
      ) from e
    if stored is None:
      raise CheckpointError(
        f'Checkpoint step {step} in {self.directory} has no state item; restore an older step with --step'
      )
    stored = _flat(getattr(stored, 'tree', stored))  # TreeMetadata wraps the tree
    wanted = _flat(abstract_state)
    if partial:
      stored = {p: v for p, v in stored.items() if p.split('/')[0] in abstract_state}
    problems = []
    for p in sorted(set(stored) - set(wanted)):
      problems.append(f'  {p}: in checkpoint, not in abstract_state')
    for p in sorted(set(wanted) - set(stored)):
      problems.append(f'  {p}: in abstract_state, not in checkpoint')
    for p in sorted(set(stored) & set(wanted)):
      s, w = stored[p], wanted[p]
      s_shape, w_shape = tuple(s.shape), tuple(w.shape)
      s_dtype, w_dtype = np.dtype(s.dtype), np.dtype(w.dtype)
      if s_shape != w_shape or s_dtype != w_dtype:
        problems.append(f'  {p}: checkpoint {s_dtype}{list(s_shape)} vs abstract_state {w_dtype}{list(w_shape)}')
    if problems:
      raise CheckpointError(
        f'Checkpoint step {step} in {self.directory} does not match the '
        f'requested state ({len(problems)} leaves differ):\n' + '\n'.join(problems)
      )

  def restore(self, step: int | None, abstract_state, *, data_iter=None):
    """Restores the state saved at `step` (latest if None) onto the shardings
    in `abstract_state` (ShapeDtypeStructs with .sharding, so a checkpoint
    saved on one mesh restores onto another). Restores `data_iter`'s
    position in place when given. Returns the state."""
    step = self._resolve(step)
    self._check_tree(step, abstract_state)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = _grain_checkpoint().CheckpointRestore(data_iter)
    return self._restore_items(step, **items)['state']

  def restore_params(self, step: int | None, abstract_state):
    """Restores only `step` and `params` of the state saved at `step` (latest if None), onto the shardings in
    `abstract_state`; opt_state comes back as None. Sampling and evaluation need no optimizer moments, which
    for AdamW are twice the parameters' memory. Returns the (partial) state."""
    step = self._resolve(step)
    want = {'step': abstract_state.step, 'params': abstract_state.params}
    self._check_tree(step, want, partial=True)
    path = os.path.join(self.directory, str(step), 'state')
    args = ocp.args.PyTreeRestore(
      item=want, restore_args=ocp.checkpoint_utils.construct_restore_args(want), partial_restore=True
    )
    try:
      with ocp.PyTreeCheckpointer() as reader:
        got = reader.restore(path, args=args)
    except (KeyError, ValueError, OSError) as e:
      raise CheckpointError(f'Restoring the parameters of step {step} from {self.directory} failed: {e}') from e
    return abstract_state.replace(step=got['step'], params=got['params'], opt_state=None)

  def move_aside(self, step: int) -> str:
    """Moves a step that does not restore to DIR/damaged/STEP (never deletes it: its files may still be
    recoverable by hand) so that the next save and resume never trip over it. Returns where it went."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, 'damaged', str(step))
    n = 1
    while os.path.exists(dst):
      dst, n = os.path.join(self.directory, 'damaged', f'{step}.{n}'), n + 1
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    self._mngr.reload()
    return dst

  def wait(self) -> None:
    """Blocks until pending async saves are written (and raises their errors as CheckpointError)."""
    try:
      self._mngr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._write_error(self._writing, e) from e

  def close(self) -> None:
    try:
      self._mngr.close()
    except (OSError, ValueError, RuntimeError) as e:
      if not self._failed:
        raise self._write_error(self._writing, e) from e
      # Orbax keeps a failed write's thread and re-raises its error at every wait, its close() included, which then
      # stops before closing its own threads; their callbacks print 'Event loop is closed' tracebacks at exit. The
      # error was raised already, so close those parts here.
      for part in ('_checkpointer', '_non_blocking_metadata_store', '_blocking_metadata_store', '_checkpoint_deleter'):
        getattr(self._mngr, part).close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def restore_newest(checkpointer: Checkpointer, restore, *, move_aside: bool = False, warn=None):
  """`restore(step)` for the newest step that restores, trying older steps when one is damaged (a CheckpointError):
  each skipped step is named with why, and moved to DIR/damaged/ when `move_aside` (the training run, the
  directory's one writer; evaluation only reads). Errors that are not damage (another model) propagate. Returns
  (step, result); a CheckpointError naming the directory when none restores."""
  warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
  steps = checkpointer.all_steps()
  if not steps:
    raise CheckpointError(f'{checkpointer.directory} holds no checkpoint yet; train first')
  why = []
  for step in reversed(steps):
    try:
      return step, restore(step)
    except CheckpointError as e:
      why.append(f'step {step}: {one_line(e)[:300]}')
      where = f'; moved to {checkpointer.move_aside(step)}' if move_aside else ''
      warn(f'lmjax: warning: checkpoint step {step} in {checkpointer.directory} does not restore{where} ({why[-1]})')
  raise CheckpointError(f'no checkpoint in {checkpointer.directory} restores: {"; ".join(why)}')
