"""Multiple-choice evaluation against lm-evaluation-harness: the same GPT-2-shaped model (random weights, built
here with transformers and imported with lmjax/hf.py), the same local JSONL, per-item agreement and items per
second side by side in one process.

Run:   pip install lm_eval==0.4.13 accelerate   (the harness and its `--model hf` backend; not needed by lmjax)
       python experiments/bench_eval.py [--sizes=tiny,124m] [--items=200,60] [--harness_batch=32]
       [--eval_batch=16,4] [--repeats=1] [--record=experiments/results.jsonl]
Data:  HellaSwag-shaped items cut from Tiny Shakespeare (a query of 20-60 words, four endings of 5-20 words, the
       true continuation among them), in lmjax's JSONL layout; the harness reads the same file through a task
       YAML (output_type: multiple_choice, doc_to_text "{{query}}", doc_to_choice "{{choices}}", doc_to_target
       "{{gold}}", its default target_delimiter " "), with HF_DATASETS_OFFLINE=1.
Model: tiny = 2 layers, d_model 64, context 256; 124m = GPT-2 small's shape (12 layers, 12 heads, d_model 768,
       context 1024, vocab 50257). The tokenizer is a byte-level BPE trained here on the same text (GPT-2's own
       needs a download). float32 on both sides.
Times: the harness from simple_evaluate called with a loaded HFLM (task building, tokenization, scoring);
       lmjax from building the task (reading, tokenizing) through its scores, first call (with compilation) and
       again (compiled); with --repeats, alternating runs and their medians. Goal (issue #19): identical per-item picks and acc/acc_norm, lmjax >= 2x the harness's
       items per second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from lmjax import hostenv

if __name__ == '__main__':  # the allocator `lmjax` runs with (lmjax/hostenv.py), for lmjax and the peer alike
  hostenv.reexec_tuned([os.path.abspath(__file__), *sys.argv[1:]])

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import numpy as np  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare', 'input.txt')
SIZES = {
  'tiny': dict(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=0),
  '124m': dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def text() -> str:
  with open(TEXT) as f:
    return f.read()


def write_items(path: str, n: int, seed: int = 0):
  words = text().split()
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for _ in range(n):
      a = rng.randrange(0, len(words) - 100)
      q = rng.randint(20, 60)
      true = ' '.join(words[a + q : a + q + rng.randint(5, 20)])
      others = []
      for _ in range(3):
        b = rng.randrange(0, len(words) - 30)
        others.append(' '.join(words[b : b + rng.randint(5, 20)]))
      gold = rng.randrange(4)
      choices = others[:gold] + [true] + others[gold:]
      f.write(json.dumps({'query': ' '.join(words[a : a + q]), 'choices': choices, 'gold': gold}) + '\n')


def build_model(size: str, directory: str):
  """A GPT2LMHeadModel with random weights and a byte-level BPE tokenizer, written as save_pretrained writes them."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=8192, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  bpe.train_from_iterator([text()], trainer)
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<|endoftext|>', eos_token='<|endoftext|>')
  tok.save_pretrained(directory)
  shape = dict(SIZES[size])
  shape['vocab_size'] = shape['vocab_size'] or len(tok)
  torch.manual_seed(0)
  config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
  return shape


def run_harness(model_dir: str, items_path: str, batch: int, name: str):
  """(per-item log-likelihoods, acc, acc_norm, seconds) from lm_eval's simple_evaluate on a loaded HFLM."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  task_dir = tempfile.mkdtemp()
  with open(os.path.join(task_dir, f'{name}.yaml'), 'w') as f:
    f.write(TASK_YAML.format(name=name, path=items_path))
  lm = HFLM(pretrained=model_dir, dtype='float32', batch_size=batch, device='cpu')
  t0 = time.perf_counter()
  out = lm_eval.simple_evaluate(
    model=lm, tasks=[name], task_manager=TaskManager(include_path=task_dir), log_samples=True, verbosity='ERROR'
  )
  seconds = time.perf_counter() - t0
  samples = sorted(out['samples'][name], key=lambda s: s['doc_id'])
  lls = [[float(r[0]) for r in s['filtered_resps']] for s in samples]
  res = out['results'][name]
  return lls, res['acc,none'], res['acc_norm,none'], seconds


def run_lmjax(workdir: str, items_path: str, eval_batch: int):
  """(per-item log-likelihoods, acc, acc_norm, first-call seconds, compiled-call seconds, compiled shapes)."""
  from lmjax import inference  # pylint: disable=import-outside-toplevel
  from lmjax.evals import spec, tasks  # pylint: disable=import-outside-toplevel

  config, tokenizer, engine, state = inference.load_run(workdir, ['mesh.data=1', f'train.eval_batch_size={eval_batch}'])
  t0 = time.perf_counter()
  mc = tasks.build(spec.parse(f'mc:{items_path}'), config, tokenizer, engine)
  metrics, records = mc(state.params)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  mc(state.params)
  again = time.perf_counter() - t0
  return [r['ll'] for r in records], metrics['acc'], metrics['acc_norm'], first, again, sorted(mc.scorer.shapes)


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return 'unknown CPU'
  fields = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
  return f'{fields.get("Model name", "?").strip()} ({os.cpu_count()} cores)'


def git_commit() -> str:
  run = lambda *a: subprocess.run(['git', *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
  return run('rev-parse', '--short', 'HEAD') + ('+dirty' if run('status', '--porcelain', '--', 'lmjax') else '')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='tiny,124m')
  p.add_argument('--items', default='200,60', help='items per size')
  p.add_argument('--harness_batch', type=int, default=32, help="lm_eval's --batch_size")
  p.add_argument(
    '--eval_batch', default='16,4', help="lmjax's train.eval_batch_size per size (x max_len tokens a call)"
  )
  p.add_argument('--repeats', type=int, default=1, help='alternating runs of each side; medians are reported')
  p.add_argument('--record', default='', help='append the result as a JSON line to this file')
  args = p.parse_args()
  from lmjax import hf  # pylint: disable=import-outside-toplevel

  sizes, counts = args.sizes.split(','), [int(x) for x in args.items.split(',')]
  eval_batches = [int(x) for x in args.eval_batch.split(',')]
  rows = []
  for size, n, eval_batch in zip(sizes, counts, eval_batches):
    root = tempfile.mkdtemp(prefix=f'bench_eval_{size}_')
    model_dir, workdir, items = (os.path.join(root, x) for x in ('hf', 'workdir', 'items.jsonl'))
    shape = build_model(size, model_dir)
    hf.import_hf(model_dir, workdir)
    write_items(items, n)
    h_times, o_firsts, o_agains = [], [], []
    for _ in range(args.repeats):  # alternating, so a change in the host's load reaches both sides
      h_ll, h_acc, h_norm, h_s = run_harness(model_dir, items, args.harness_batch, f'bench_{size}')
      o_ll, o_acc, o_norm, o_first, o_again, shapes = run_lmjax(workdir, items, eval_batch)
      h_times.append(h_s)
      o_firsts.append(o_first)
      o_agains.append(o_again)
    h_s, o_first, o_again = (statistics.median(x) for x in (h_times, o_firsts, o_agains))
    with open(items) as f:
      lengths = [np.array([len(c) for c in json.loads(line)['choices']]) for line in f]
    picks = lambda lls: [int(np.argmax(x)) for x in lls]
    per_char = lambda lls, lengths=lengths: [int(np.argmax(np.array(x) / n)) for x, n in zip(lls, lengths)]
    row = {
      'size': size,
      'model': {k: shape[k] for k in ('n_layer', 'n_head', 'n_embd', 'n_positions', 'vocab_size')},
      'items': n,
      'requests': 4 * n,
      'same_picks': picks(h_ll) == picks(o_ll),
      'same_picks_norm': per_char(h_ll) == per_char(o_ll),
      'max_abs_ll_diff': float(max(abs(a - b) for x, y in zip(h_ll, o_ll) for a, b in zip(x, y))),
      'harness': {'acc': h_acc, 'acc_norm': h_norm, 'seconds': round(h_s, 2), 'items_per_s': round(n / h_s, 2)},
      'lmjax': {
        'acc': o_acc,
        'acc_norm': o_norm,
        'seconds_first': round(o_first, 2),
        'items_per_s_first': round(n / o_first, 2),
        'seconds_compiled': round(o_again, 2),
        'items_per_s_compiled': round(n / o_again, 2),
        'compiled_shapes': len(shapes),
      },
      'all_seconds': {'harness': h_times, 'lmjax_first': o_firsts, 'lmjax_compiled': o_agains},
      'harness_batch': args.harness_batch,
      'lmjax_eval_batch_size': eval_batch,
    }
    row['ratio_first'] = round(row['lmjax']['items_per_s_first'] / row['harness']['items_per_s'], 2)
    row['ratio_compiled'] = round(row['lmjax']['items_per_s_compiled'] / row['harness']['items_per_s'], 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
  import lm_eval  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  record = {
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'hardware': cpu_model(),
    'git_commit': git_commit(),
    'benchmark': 'multiple choice vs lm-evaluation-harness (--model hf), same imported random GPT-2, same JSONL',
    'versions': {
      'lm_eval': lm_eval.__version__ if hasattr(lm_eval, '__version__') else '?',
      'torch': torch.__version__,
      'transformers': transformers.__version__,
      'torch_threads': torch.get_num_threads(),
    },
    'allocator': hostenv.allocator(),
    'rows': rows,
  }
  print(
    f'{"size":6s} | items | same picks (acc, norm) | max |dll| | harness it/s | lmjax it/s (first, compiled) | ratio'
  )
  for r in rows:
    print(
      f'{r["size"]:6s} | {r["items"]:5d} | {r["same_picks"]!s:5s} {r["same_picks_norm"]!s:5s}       | '
      f'{r["max_abs_ll_diff"]:.1e} | {r["harness"]["items_per_s"]:12.2f} | '
      f'{r["lmjax"]["items_per_s_first"]:9.2f} {r["lmjax"]["items_per_s_compiled"]:9.2f}          | '
      f'{r["ratio_first"]:.2f}x, {r["ratio_compiled"]:.2f}x'
    )
  if args.record:
    with open(args.record, 'a') as f:
      f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  main()
