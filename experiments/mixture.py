"""A data-mixture ablation: Tiny Shakespeare mixed with Python source code at two weights, 3 seeds each: 6 runs of
nanoGPT's CPU recipe (2000 steps; UTF-8 bytes as tokens, which for Shakespeare are its characters), evaluated every 250 steps on each source alone and pooled.

The second corpus is local on every machine lmjax runs on: the .py files of the running Python's standard library
(`sysconfig`'s stdlib folder; files a-s train, t-z evaluate). Code is a different language for the same model,
so the question the table answers is what a 10% versus a 30% share of it costs on Shakespeare (val_loss/shakespeare)
and buys on code (val_bpb/code). The weights are varied as a stage at step 0 (data.mixture_schedule), which
replaces the sources' own weights and keeps the member names short.

Run:   lmjax sweep experiments/mixture.py --workdir=runs/mixture
Takes: 27 min for the 6 members on a shared 2-core VM (2026-12-03).
Found: 30% code instead of 10% costs Shakespeare +0.052 val loss (1.8855 → 1.9377, Welch p = 0.0012) and buys code
       -0.340 bits per byte (3.1198 → 2.7794, p = 0.00011); the pooled val_bpb falls 0.133 (p = 4e-05). Table and
       plots in experiments/results/mixture/.
"""

import sysconfig

from lmjax.sweep import Sweep

STDLIB = sysconfig.get_paths()['stdlib']
SOURCES = (
  {'name': 'shakespeare', 'weight': 1.0},
  {
    'name': 'code',
    'weight': 0.0,  # its share comes from the swept stage at step 0
    'dataset': 'text_files',
    'train_split': f'{STDLIB}/[a-s]*.py',
    'eval_split': f'{STDLIB}/[t-z]*.py',
  },
)


def stage(code_share: float) -> str:
  return repr(((0, {'shakespeare': round(1 - code_share, 6), 'code': code_share}),))


def get_sweep():
  return Sweep(
    config='configs/shakespeare_char_cpu.py',
    overrides={
      'data.manual_dir': '../shared/data/tinyshakespeare',
      'data.sources': repr(SOURCES),
      'data.tokenizer': 'byte',  # the code eval split has characters its train split lacks: chars cannot encode it
      'train.eval_every': 250,
      'train.eval_max_batches': 20,  # 20 x 64 rows of each source: the code eval split is 0.9 MB
    },
    product={'data.mixture_schedule': (stage(0.1), stage(0.3))},
    seeds=(0, 1, 2),
    baseline={'data.mixture_schedule': stage(0.1)},
    metrics=('val_loss/shakespeare', 'val_bpb/code', 'val_bpb'),
  )
