"""A jax.profiler trace of chosen training steps (train.profile_steps) or of a benchmark (lmjax bench --profile).

The trace lands in DIR/plugins/profile/<time>/: open it with TensorBoard's profile plugin
(`pip install tensorboard tensorboard-plugin-profile && tensorboard --logdir DIR`, tab "Profile"), or load its
`*.trace.json.gz` in https://ui.perfetto.dev. Each traced call of the train step carries an annotation
`lmjax_step_N` (N = the last optimizer step the call takes), so the timeline names the steps. Tracing needs no
recompilation, and when off the loop pays one `is None` test per call.
"""

from __future__ import annotations

import contextlib

import jax


class ProfileWindow:
  """Traces the calls that take steps first + 1 ... first + count (whole calls of steps_per_call steps)."""

  def __init__(self, first: int, count: int, log_dir: str):
    self.first, self.last, self.log_dir = first, first + count, log_dir
    self.active = self.done = False

  def annotation(self, step: int, k: int):
    """Before dispatching the call that takes steps step + 1 ... step + k: starts the trace at the window's start,
    and returns the context that names the call in the trace."""
    if not self.done and not self.active and self.first <= step < self.last:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True
    return jax.profiler.TraceAnnotation(f'lmjax_step_{step + k}') if self.active else contextlib.nullcontext()

  def after(self, step: int, state):
    """After the call that brought the run to `step`: stops the trace once the window's steps have run."""
    if self.active and step >= self.last:
      jax.block_until_ready(state)  # the traced calls must finish inside the trace
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.done = False, True


@contextlib.contextmanager
def trace(log_dir: str):
  """A trace of whatever runs inside the block (empty `log_dir`: no trace)."""
  if not log_dir:
    yield
    return
  jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
  try:
    yield
  finally:
    jax.profiler.stop_trace()
