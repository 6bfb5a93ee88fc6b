"""The four kinds of evaluation task, built once from a spec (lmjax/evals/spec.py) and run on parameters, and
`lmjax eval --task=...`.

A task reads and tokenizes its data when it is built, so the training loop's periodic action (lmjax/actions.py
EvalTask) pays for that once; calling it with parameters returns (metrics, per-item records).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from lmjax import data as data_lib, metrics, sources
from lmjax.errors import DataError
from lmjax.evals import formats, loglikelihood, spec as spec_lib, textmetrics

GEN_DEFAULTS = {
  'max_new_tokens': 64,
  'temperature': 0.0,
  'top_k': 0,
  'top_p': 1.0,
  'min_p': 0.0,
  'stop': '\n',
  'seed': 0,
}
DIV_DEFAULTS = {'max_new_tokens': 64, 'num_samples': 8, 'stop': '', 'seed': 0}  # the rest: the run's sample.*


class ChoiceTask:
  """Multiple choice (or LAMBADA-style single continuations): acc, acc_norm, n."""

  def __init__(self, spec, config, tokenizer, engine):
    self.spec, self.engine = spec, engine
    self.items = formats.read_choices(spec.data, spec.get('format', ''), spec.get('labels', ''), spec.get('limit', 0))
    self.requests = loglikelihood.choice_requests(
      tokenizer, self.items, engine.model_cfg.max_len, spec.get('bos', False)
    )
    self.scorer = loglikelihood.Scorer(engine)

  def __call__(self, params):
    bar = metrics.progress_bar(len(self.requests), self.spec.name, 'req')
    ll, greedy = self.scorer(params, self.requests, progress=bar.update if bar is not None else None)
    if bar is not None:
      bar.close()
    results = loglikelihood.choice_results(self.items, ll, greedy)
    records = [
      {'index': k, 'where': item.where, 'query': item.query, 'choices': list(item.choices), 'gold': item.gold, **r}
      for k, (item, r) in enumerate(zip(self.items, results))
    ]
    return loglikelihood.choice_metrics(self.items, results), records


class PerplexityTask:
  """Loss, perplexity and bits per byte of a split of the run's dataset or of local text files, cut into rows as
  the run's eval split is."""

  def __init__(self, spec, config, tokenizer, engine):
    self.engine = engine
    if spec_lib.is_path(spec.data):
      docs = sources.TextFiles(spec.data, config.data.file_docs)
    else:
      docs = sources.documents(config.data, spec.data)
    # limit: the first `limit` eval batches, as train.eval_max_batches
    self.batches, self.bytes_per_token = data_lib.eval_set(
      config, tokenizer, docs, max_batches=spec.get('limit') or None
    )

  def __call__(self, params):
    out = self.engine.evaluate(params, self.batches, self.bytes_per_token)
    return {k.removeprefix('val_'): v for k, v in out.items()}, []


def _decoding(spec, defaults: dict, flags: dict) -> dict:
  """The decoding options of a generating task: its kind's defaults, then the command line's, then its own."""
  out = dict(defaults)
  out.update({k: v for k, v in flags.items() if v is not None and k in spec_lib.OPTIONS[spec.kind]})
  out.update({k: v for k, v in spec.options.items() if k in defaults or k in flags})
  return out


class _Generating:
  """What generation and diversity share: prompts decoded in calls of a fixed number of rows (the last call is
  filled up with copies, so every call has one compiled shape per prompt length bucket)."""

  def __init__(self, config, tokenizer, engine, options):
    self.config, self.tokenizer, self.engine, self.options = config, tokenizer, engine, options

  def check_prompt(self, prompt: str, where: str):
    if len(self.tokenizer.encode(prompt)) == 0 and self.tokenizer.bos_id is None:
      raise DataError(f'{where}: an empty prompt, and this tokenizer has no BOS to start from; give it some text')

  def generate(self, params, prompts: list, n: int, desc: str) -> list:
    from lmjax import sample  # pylint: disable=import-outside-toplevel

    o = self.options
    stop = o['stop'] if isinstance(o['stop'], (list, tuple)) else [o['stop']]
    per_call = max(1, self.config.train.eval_batch_size // n)
    bar = metrics.progress_bar(len(prompts), desc, 'req')
    texts = []
    for k in range(0, len(prompts), per_call):
      chunk = prompts[k : k + per_call]
      filled = chunk + [chunk[-1]] * (per_call - len(chunk)) if len(prompts) > per_call else chunk
      out = sample.sample_texts(
        params,
        self.engine.model_cfg,
        self.tokenizer,
        filled,
        stop=[s for s in stop if s],
        max_new_tokens=o['max_new_tokens'],
        temperature=o['temperature'],
        top_k=o['top_k'],
        top_p=o['top_p'],
        min_p=o['min_p'],
        num_return_sequences=n,
        seed=o['seed'] + k,
        mesh=self.engine.mesh,
        window_chunk=int(self.config.sample.get('window_chunk', 0)),
      )
      texts += out[: len(chunk) * n]
      if bar is not None:
        bar.update(len(chunk))
    if bar is not None:
      bar.close()
    return texts


class GenerationTask(_Generating):
  """Decodes each prompt (greedy by default) and scores it against its references: exact match, BLEU, ROUGE-L."""

  def __init__(self, spec, config, tokenizer, engine, flags):
    super().__init__(config, tokenizer, engine, _decoding(spec, GEN_DEFAULTS, flags))
    self.spec = spec
    self.items = formats.read_generation(spec.data, spec.get('limit', 0))
    for item in self.items:
      self.check_prompt(item.prompt, item.where)

  def __call__(self, params):
    predictions = self.generate(params, [i.prompt for i in self.items], 1, self.spec.name)
    refs = [i.references for i in self.items]
    scorer = textmetrics.rouge_scorer()
    em = [textmetrics.exact_match(p, r) for p, r in zip(predictions, refs)]
    rouge = [textmetrics.rouge_l(p, r, scorer) for p, r in zip(predictions, refs)]
    metrics = {
      'exact_match': float(np.mean(em)),
      'bleu': textmetrics.corpus_bleu(predictions, refs),
      'rouge_l': float(np.mean(rouge)),
      'n': len(self.items),
    }
    records = [
      {'index': k, 'where': i.where, 'prompt': i.prompt, 'references': list(i.references), 'prediction': p,
       'exact_match': e, 'rouge_l': r}
      for k, (i, p, e, r) in enumerate(zip(self.items, predictions, em, rouge))
    ]  # fmt: skip
    return metrics, records


class DiversityTask(_Generating):
  """num_samples free samples of each prompt: distinct-1/2/3 and self-BLEU within each prompt's samples,
  averaged over the prompts."""

  def __init__(self, spec, config, tokenizer, engine, flags):
    s = config.sample
    defaults = {**DIV_DEFAULTS, 'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p, 'min_p': s.min_p}
    super().__init__(config, tokenizer, engine, _decoding(spec, defaults, flags))
    self.spec = spec
    self.prompts = formats.read_prompts(spec.data, spec.get('limit', 0))
    for k, p in enumerate(self.prompts):
      self.check_prompt(p, f'{spec.data} (prompt {k})')
    if self.options['num_samples'] < 2:
      raise DataError(f'eval task {spec.text!r}: self-BLEU compares samples with each other; ask num_samples>=2')

  def __call__(self, params):
    n = self.options['num_samples']
    texts = self.generate(params, self.prompts, n, self.spec.name)
    groups = [texts[k * n : (k + 1) * n] for k in range(len(self.prompts))]
    per_prompt = [
      {**{f'distinct_{m}': textmetrics.distinct_n(g, m) for m in (1, 2, 3)}, 'self_bleu': textmetrics.self_bleu(g)}
      for g in groups
    ]
    metrics = {k: float(np.mean([p[k] for p in per_prompt])) for k in per_prompt[0]}
    metrics['n'] = len(self.prompts)
    records = [
      {'index': k, 'prompt': p, 'samples': g, **m} for k, (p, g, m) in enumerate(zip(self.prompts, groups, per_prompt))
    ]
    return metrics, records


def check_data(spec, where: str = 'train.eval_tasks'):
  """Reads a task's files as building it will, but needs no tokenizer or model: a training run checks its
  train.eval_tasks with this before any data or compile work, so a missing or malformed file does not wait for the
  first evaluation. A ppl split of the run's own dataset is checked with that dataset."""
  try:
    if spec.kind == 'mc':
      formats.read_choices(spec.data, spec.get('format', ''), spec.get('labels', ''), spec.get('limit', 0))
    elif spec.kind == 'gen':
      formats.read_generation(spec.data, spec.get('limit', 0))
    elif spec.kind == 'div':
      formats.read_prompts(spec.data, spec.get('limit', 0))
    elif spec_lib.is_path(spec.data):
      sources.glob(spec.data)
  except DataError as e:
    raise DataError(f'{where} task {spec.name!r} ({spec.text}): {e}') from None


def build(spec, config, tokenizer, engine, flags=None):
  """The task a spec describes, its data read and tokenized. `flags`: decoding options from the command line
  (None = not given), under the spec's own."""
  flags = flags or {}
  if spec.kind == 'mc':
    return ChoiceTask(spec, config, tokenizer, engine)
  if spec.kind == 'ppl':
    return PerplexityTask(spec, config, tokenizer, engine)
  if spec.kind == 'gen':
    return GenerationTask(spec, config, tokenizer, engine, flags)
  return DiversityTask(spec, config, tokenizer, engine, flags)


# ------------------------------------------------------------------------------------------ `lmjax eval --task`


def run(
  workdir: str, tasks, datas=(), overrides=(), step=None, flags=None, log_samples: str = '', out=None, params='raw'
):
  """`lmjax eval --task=...`: each task on a workdir's checkpoint; prints one JSON object per task (and, with
  log_samples, writes one JSON line per item). Returns the objects. Every process scores; process 0 writes."""
  import jax  # pylint: disable=import-outside-toplevel
  from lmjax import inference  # pylint: disable=import-outside-toplevel

  primary = jax.process_index() == 0
  out = out or sys.stdout
  specs = spec_lib.parse_all(tasks, datas)  # a bad --task fails before the checkpoint is read
  config, tokenizer, engine, state = inference.load_run(workdir, overrides, step=step, params=params)
  inference.fit_eval_batch(config, engine)
  built = [build(s, config, tokenizer, engine, flags) for s in specs]  # every file is read before any is scored
  try:
    log = open(log_samples, 'w') if log_samples and primary else None
  except OSError as e:
    raise DataError(f'--log_samples {log_samples}: {e.strerror or e}; give a writable file') from None
  results = []
  try:
    for s, t in zip(specs, built):
      metrics, records = t(state.params)
      row = {'task': s.name, 'kind': s.kind, 'step': int(state.step), **metrics}
      if primary:
        print(json.dumps(row), file=out, flush=True)
      results.append(row)
      for r in records if log is not None else ():
        log.write(json.dumps({'task': s.name, **r}) + '\n')
  finally:
    if log is not None:
      log.close()
  return results
