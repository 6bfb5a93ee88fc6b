"""LayerNorm vs RMSNorm × learned vs rotary positions on nanoGPT's CPU recipe (Tiny Shakespeare, characters),
3 seeds each: 12 runs of 2000 steps, evaluated every 100 steps over the whole validation split.

Run:   lmjax sweep experiments/norm_pos.py --workdir=runs/norm_pos
Takes: (filled in after the shipped run)
Found: (filled in after the shipped run); the table and plots are in experiments/results/norm_pos/.
"""

from lmjax.sweep import Sweep


def get_sweep():
  return Sweep(
    config='configs/shakespeare_char_cpu.py',
    overrides={
      'data.manual_dir': '../shared/data/tinyshakespeare',
      'train.steps': 2000,
      'train.eval_every': 100,
    },
    product={'model.norm': ('layernorm', 'rmsnorm'), 'model.positions': ('learned', 'rope')},
    seeds=(0, 1, 2),
    baseline={'model.norm': 'layernorm', 'model.positions': 'learned'},
    metrics=('val_loss', 'val_bpb', 'tokens_per_sec'),
  )
