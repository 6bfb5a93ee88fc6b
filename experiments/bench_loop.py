"""The whole training loop's speed, two source trees side by side: the same `lmjax train` run from each.

Run:   python experiments/bench_loop.py --trees OLD_CHECKOUT NEW_CHECKOUT [--config=configs/shakespeare_char_cpu.py]
         [--steps=500] [--rounds=3] [--config.a.b=value ...]
What:  each round trains --steps steps from a fresh workdir with each tree in turn (PYTHONPATH=TREE, a process of
       its own, the train.compilation_cache_dir off so both compile), and reads the tokens/s the loop itself logged
       in metrics.jsonl (log windows after the first, whose time includes the first call) and the command's wall
       time. The trees alternate every round, so a host whose speed drifts slows both alike; medians over rounds.
       Prints the CPU model: figures count only as a ratio measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from lmjax import workdir as workdir_lib


def one_run(tree: str, config: str, steps: int, overrides: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as wd:
    cmd = [sys.executable, '-m', 'lmjax', 'train', f'--config={config}', f'--workdir={wd}/run']
    cmd += [
      f'--config.train.steps={steps}',
      '--config.train.compilation_cache_dir=',
      '--config.train.progress_bar=false',
    ]
    cmd += overrides
    env = {**os.environ, 'PYTHONPATH': tree, 'HF_HUB_OFFLINE': '1'}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(f'{wd}/run/metrics.jsonl') as f:
      tps = [r['tokens_per_sec'] for r in map(json.loads, f) if 'tokens_per_sec' in r][1:]
  return {'tokens_per_sec': statistics.median(tps), 'wall_s': wall}


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--trees', nargs=2, required=True, help='two checkouts: the baseline, then the candidate')
  p.add_argument('--config', default='configs/shakespeare_char_cpu.py')
  p.add_argument('--steps', type=int, default=500)
  p.add_argument('--rounds', type=int, default=3)
  args, overrides = p.parse_known_args()
  config = os.path.abspath(args.config)
  runs = {t: [] for t in args.trees}
  for r in range(args.rounds):
    for tree in args.trees if r % 2 == 0 else reversed(args.trees):
      runs[tree].append(one_run(os.path.abspath(tree), config, args.steps, overrides))
      print(f'round {r + 1} {tree}: {runs[tree][-1]}', flush=True)
  old, new = (statistics.median(x['tokens_per_sec'] for x in runs[t]) for t in args.trees)
  old_wall, new_wall = (statistics.median(x['wall_s'] for x in runs[t]) for t in args.trees)
  print(f'cpu: {workdir_lib.cpu_model()} ({os.cpu_count()} cores)')
  print(f'{args.trees[0]}: {old:,.0f} tokens/s, {old_wall:.1f} s per command')
  print(f'{args.trees[1]}: {new:,.0f} tokens/s, {new_wall:.1f} s per command')
  print(f'candidate / baseline: {new / old:.3f}x tokens/s, {new_wall / old_wall:.3f}x wall time')


if __name__ == '__main__':
  main()
