"""A high-learning-rate stability ablation on nanoGPT's CPU recipe (Tiny Shakespeare, characters), 3 seeds: at 10x
the recipe's learning rate (1e-2), does QK-norm with z-loss (1e-4, PaLM's) train better than the plain model?

Both variants skip non-finite updates (train.nonfinite=skip) rather than stop, so a seed that spikes still finishes
and counts; the results table's p-values are Welch's t-test over the 3 seeds (lmjax/results.py).

Run:   lmjax sweep experiments/qk_norm_zloss.py --workdir=runs/qk_norm_zloss
Takes: 17 min for the 6 members on a shared 2-core VM (2026-12-03).
Found: at 1e-2 the plain model did not become unstable: no step was skipped in any run, the largest gradient norm
       was 1.30, and it ended at val loss 1.7799 ± 0.0012 (better than the recipe's 1e-3). QK-norm + z-loss: 1.7946 ±
       0.0405, within seed noise (+0.015, Welch p = 0.59); z_loss ended near 0.005. So this model at this length
       has no instability for them to cure; a harder setting (a larger lr or model) is the next ablation. Table and
       plots in experiments/results/qk_norm_zloss/.
"""

from lmjax.sweep import Sweep

HIGH_LR = 1e-2


def get_sweep():
  return Sweep(
    config='configs/shakespeare_char_cpu.py',
    overrides={
      'data.manual_dir': '../shared/data/tinyshakespeare',
      'train.eval_every': 100,
      'optimizer.lr': HIGH_LR,
      'optimizer.min_lr': HIGH_LR / 10,
      'train.nonfinite': 'skip',
      'train.max_skipped': 100,
    },
    variants=({}, {'model.qk_norm': True, 'train.z_loss': 1e-4}),
    seeds=(0, 1, 2),
    baseline={},
    metrics=('val_loss', 'best_val_loss'),
  )
