"""Cosine against warmup-stable-decay with three cooldown lengths, each branched from one stable run, on nanoGPT's
CPU recipe (Tiny Shakespeare, characters), 3 seeds: does a WSD cooldown of 10%, 20% or 40% of a 2000-step budget
match the cosine schedule's final val loss?

Per seed: cosine (2000 steps); the stable run (WSD without a cooldown, 1800 steps, keeping a checkpoint every
200); and three cooldowns of 200, 400 and 800 steps (linear to min_lr), each a train.branch_from of the stable
run at step 2000 - cooldown, so each ends at step 2000 like the cosine run. Branching trains 1800 + 200 + 400 + 800
= 3200 steps per seed for the three cooldowns, against 3 x 2000 = 6000 trained from scratch; the wall time of each
member is in the results table (wall_s), which is where the saving is measured.

Run:   lmjax sweep experiments/cooldowns.py --workdir=runs/cooldowns
Then:  lmjax schedule --config=configs/shakespeare_char_cpu.py --config.optimizer.schedule=wsd \
         --config.optimizer.cooldown_steps=400 --png=runs/cooldowns/wsd_400.png   (the curve of one member)
Takes: 34 min for the 15 members on a shared 2-core VM (2026-12-03): per seed, the cosine run ~250 s, the stable
       run ~245 s and the three branches 34, 49 and 87 s.
Found: each cooldown ends below cosine's val loss (1.8925): 200 steps 1.8371, 400 steps 1.8329, 800 steps 1.8390
       (Welch p = 0.0013, 0.0010, 0.0014 against cosine); table and plots in experiments/results/cooldowns/.
"""

from lmjax.sweep import BranchFrom, Sweep

STEPS = 2000
COOLDOWNS = (200, 400, 800)
STABLE = {
  'optimizer.schedule': 'wsd',
  'optimizer.cooldown_steps': 0,
  'train.steps': STEPS - min(COOLDOWNS),
  'train.checkpoint_every': 200,  # the branch points (1200, 1600, 1800) are kept checkpoints
  'train.keep_checkpoints': 10,
}


def get_sweep():
  cooldowns = tuple(
    {
      'optimizer.schedule': 'wsd',
      'optimizer.cooldown_steps': c,
      'train.steps': STEPS,
      'train.branch_from': BranchFrom(STABLE, STEPS - c),
    }
    for c in COOLDOWNS
  )
  return Sweep(
    config='configs/shakespeare_char_cpu.py',
    overrides={'data.manual_dir': '../shared/data/tinyshakespeare', 'train.eval_every': 100},
    variants=(
      {'optimizer.schedule': 'cosine', 'train.steps': STEPS},
      STABLE,
      *cooldowns,
    ),  # the source before its branches
    seeds=(0, 1, 2),
    baseline={'optimizer.schedule': 'cosine', 'train.steps': STEPS},
    metrics=('val_loss',),
  )
