"""Data mixtures: the rows of several named sources, drawn by weight into one stream of training batches.

data.sources names the sources (lmjax/config.py says what an entry may set). lmjax/data.py reads each one and cuts
it into rows as it would a lone dataset, all with one tokenizer; this module decides which source fills each row.

Row k of the global batch stream (batch t, row j: k = t * batch_size + j) takes its source from the stage holding
batch t (data.mixture_schedule; the first stage is the sources' own weights, from step 0) and from the seed alone:
a stage's rows are cut into blocks of BLOCK rows, each block holds every source's share of its rows exactly (largest
remainder) in a seeded random order. Realised shares therefore stay within a row or so per block of the weights,
and a process computes the sources of its own rows of each global batch and reads them from its own slice of each
source: it reads only its share.

The iterator's state is the batch count and every source's own iterator state, so a resumed run continues exactly.
Because row k's source depends only on the seed and the stage holding it, a resumed run may change or add stages
that start at or after the step it resumes at (`check_resume`), and every batch before them is what it was.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import numpy as np

from lmjax import config as config_lib
from lmjax.errors import ConfigError

BLOCK = 1024  # rows per block: a block holds each source's share exactly, so shares track weights block by block


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  data: ml_collections.ConfigDict  # data.* with this source's fields set: what lmjax/sources.py reads
  seed: int  # its rows' shuffle: the run's seed for the first source (one source reads as the lone dataset does)


def sources(config) -> list[Source]:
  """The data.sources of a config, each with its own data config and seed."""
  dc, out = config.data, []
  for i, entry in enumerate(dc.sources):
    own = ml_collections.ConfigDict({k: v for k, v in dc.to_dict().items() if k not in ('sources', 'mixture_schedule')})
    for k in config_lib.SOURCE_FIELDS:
      if k in entry:
        own[k] = entry[k]
    out.append(Source(entry['name'], own, config.seed + 1_000_003 * i))
  return out


def stages(dc) -> list[tuple[int, np.ndarray]]:
  """(first step, weights of data.sources in order, summing to 1) of every stage, the sources' own from step 0
  (unless a stage at step 0 replaces them: of two stages at one step, the later holds)."""
  names = [s['name'] for s in dc.sources]
  raw = [(0, {s['name']: s['weight'] for s in dc.sources})] + [(int(t), dict(w)) for t, w in dc.mixture_schedule]
  out = []
  for step, weights in raw:
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    out.append((step, w / w.sum()))
  return out


def check_resume(recorded_data: dict, dc, step: int) -> None:
  """ConfigError unless resuming at `step` keeps the sources and every stage that has begun (starts before `step`):
  those decided the batches already trained on, and the saved iterator positions count rows of these sources."""
  old_sources = recorded_data.get('sources') or ()
  if not old_sources and not dc.sources:
    return

  def without_weight(entries):
    return [{k: v for k, v in e.items() if k != 'weight'} for e in entries]

  if without_weight(old_sources) != without_weight(dc.sources):
    raise ConfigError(
      f'the checkpoint was trained on data.sources {list(old_sources)}, this run names {list(dc.sources)}; a '
      'resumed run keeps its sources (change their weights with a new stage in data.mixture_schedule)'
    )
  old = ml_collections.ConfigDict(
    {'sources': old_sources, 'mixture_schedule': recorded_data.get('mixture_schedule', ())}
  )
  begun = lambda d: [(t, w.tolist()) for t, w in stages(d) if t < step]
  if begun(old) != begun(dc):
    raise ConfigError(
      f'data.mixture_schedule changes stages that began before step {step}, where this run resumes: the batches '
      f'already trained on came from them. Keep the stages up to step {step} as they were '
      f'({_describe(old)}) and change or add only later ones'
    )


def _describe(dc) -> str:
  weights = {s['name']: s['weight'] for s in dc.sources}
  return f'sources {weights}, schedule {[tuple(s) for s in dc.mixture_schedule]}'


def _hash64(x: np.ndarray) -> np.ndarray:
  """splitmix64 of uint64s: a seeded order that no library upgrade changes (resume across upgrades stays exact)."""
  with np.errstate(over='ignore'):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def block_sources(weights: np.ndarray, seed: int, stage_start: int, block: int) -> np.ndarray:
  """The source of each of a block's BLOCK rows: each source's share of them exactly (largest remainder), in an
  order drawn from (seed, stage, block)."""
  exact = weights * BLOCK
  counts = np.floor(exact).astype(np.int64)
  short = BLOCK - counts.sum()
  counts[np.argsort(-(exact - counts), kind='stable')[:short]] += 1
  ids = np.repeat(np.arange(len(weights)), counts)
  key = _hash64(np.uint64(seed % 2**63) * np.uint64(1_000_003) + np.uint64(stage_start))
  key = _hash64(key + np.uint64(block))
  return ids[np.argsort(_hash64(key + np.arange(BLOCK, dtype=np.uint64)), kind='stable')]


class MixtureIterator:
  """Batches of this process's rows, each row from the source the mixture draws for it. Checkpointable: grain's
  Orbax handler saves get_state() (bytes) per process and set_state() restores it (lmjax/checkpoint.py)."""

  def __init__(self, names, rows, stage_list, seed: int, global_batch: int, process_index: int, process_count: int):
    self.names, self._rows, self._stages, self._seed = list(names), list(rows), stage_list, seed
    self._B, self._local, self._pi = global_batch, global_batch // process_count, process_index
    self._batch = 0  # global batches drawn so far (= the step the next batch trains)
    self._block = (None, None)  # ((stage, block), its sources): the rows of a batch mostly share a block

  def __iter__(self):
    return self

  def _stage(self, t: int) -> tuple[int, np.ndarray]:
    return [s for s in self._stages if s[0] <= t][-1]  # the last begun: a stage at step 0 replaces the sources'

  def sources_of_batch(self, t: int) -> np.ndarray:
    """The source index of each of this process's rows of global batch t."""
    start, weights = self._stage(t)
    k = (t - start) * self._B + self._pi * self._local + np.arange(self._local)
    out = np.empty(self._local, np.int64)
    for block in np.unique(k // BLOCK):
      if self._block[0] != (start, block):
        self._block = ((start, block), block_sources(weights, self._seed, start, int(block)))
      inside = k // BLOCK == block
      out[inside] = self._block[1][k[inside] % BLOCK]
    return out

  def __next__(self) -> dict:
    rows = [next(self._rows[i]) for i in self.sources_of_batch(self._batch)]
    self._batch += 1
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def get_state(self) -> bytes:
    states = {n: it.get_state() for n, it in zip(self.names, self._rows)}
    return json.dumps({'batch': self._batch, 'sources': states}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    for name, it in zip(self.names, self._rows):
      it.set_state(saved['sources'][name])
    self._batch = int(saved['batch'])

  def start_prefetch(self) -> None:
    for it in self._rows:
      if hasattr(it, 'start_prefetch'):
        it.start_prefetch()
