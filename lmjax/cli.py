"""The one entry point: `lmjax COMMAND ...` (also `python -m lmjax`), as a table of commands.

Each command is its arguments and one function to run; the functions import what they use, so `lmjax --help`
imports no JAX. `--config.a.b=value` overrides any config field (type-checked; unknown keys name the closest valid
ones). Exit codes are decided here: 0 done, 2 a user error (one line, `lmjax CMD: error: ...`), 143 stopped by
SIGTERM after checkpointing, 1 from `lmjax sweep` when members failed; anything else is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

from lmjax import hostenv  # imports nothing heavy: the process is set up before JAX loads
from lmjax.errors import ConfigError, UserError, WorkdirError, one_line

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM
EXIT_MEMBERS_FAILED = 1  # lmjax sweep: some members failed (each said why); the others finished


def _multihost(p):
  g = p.add_argument_group('multi-host (TPU VMs, SLURM and Open MPI are auto-detected; others pass these)')
  g.add_argument('--coordinator', default='', help='host:port of process 0')
  g.add_argument('--num_processes', type=int, default=0)
  g.add_argument('--process_id', type=int, default=-1)


def _step(text: str):
  if text == 'best' or text.isdigit():
    return int(text) if text.isdigit() else text
  raise argparse.ArgumentTypeError(f'--step must be a step number or "best", got {text!r}')


def _workdir_args(p, what: str):
  p.add_argument('--workdir', required=True, help=f'the --workdir of an `lmjax train` run to {what}')
  p.add_argument(
    '--step', type=_step, default=None, help='a checkpoint step, or "best" (train.keep_best); default: the latest'
  )
  p.add_argument(
    '--params',
    choices=('raw', 'ema'),  # config.PARAMS (not imported: --help imports nothing of the model)
    default='raw',
    help='the trained parameters, or their exponential moving average (runs trained with train.ema_decay)',
  )


# ---------------------------------------------------------------------------------------------- the commands


def _train_args(p):
  p.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  p.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config; re-run to resume')
  _multihost(p)


def _train(args, overrides):
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load(args.config, overrides)  # validated before JAX is imported or any data is read
  hostenv.mark('config loaded')
  from lmjax import train  # pylint: disable=import-outside-toplevel

  hostenv.mark('imports')

  hostenv.init_distributed(args.coordinator, args.num_processes, args.process_id)
  try:
    train.train(config, args.workdir)
  except train.Preempted:
    return EXIT_PREEMPTED
  return 0


def _eval_args(p):
  _workdir_args(p, 'evaluate')
  g = p.add_argument_group('tasks (without --task: loss, perplexity and bits per byte of the eval split)')
  g.add_argument(
    '--task',
    action='append',
    default=[],
    help='KIND[:DATA][,KEY=VALUE...], repeatable: mc:FILE.jsonl, ppl:SPLIT or ppl:PATH, gen:FILE.jsonl, div:FILE '
    '(lmjax/evals/spec.py)',
  )
  g.add_argument('--data', action='append', default=[], help='the data of the --task before it that names none')
  g.add_argument('--log_samples', default='', help='write one JSON line per item of every task to this file')
  g = p.add_argument_group('decoding of gen (default greedy) and div (default the sample.* config) tasks')
  g.add_argument('--max_new_tokens', type=int, default=None)
  g.add_argument('--temperature', type=float, default=None, help='0 = greedy')
  g.add_argument('--greedy', action='store_true', help='same as --temperature=0')
  g.add_argument('--top_k', type=int, default=None)
  g.add_argument('--top_p', type=float, default=None)
  g.add_argument('--min_p', type=float, default=None)
  g.add_argument('--stop', action='append', default=[], help='cut a generation before this text (repeatable)')
  g.add_argument('--num_samples', type=int, default=None, help='div: samples per prompt')
  g.add_argument('--seed', type=int, default=None)
  _multihost(p)


def _eval(args, overrides):
  from lmjax import inference  # pylint: disable=import-outside-toplevel

  hostenv.mark('imports')

  hostenv.init_distributed(args.coordinator, args.num_processes, args.process_id)
  if not args.task:
    if args.data:
      raise ConfigError('--data names the data of a --task; add --task=mc (or ppl, gen, div) before it')
    print(json.dumps(inference.evaluate_run(args.workdir, overrides, step=args.step, params=args.params)))
    hostenv.mark('done')
    return 0
  from lmjax.evals import tasks  # pylint: disable=import-outside-toplevel

  names = ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'min_p', 'num_samples', 'seed')
  flags = {k: getattr(args, k) for k in names}
  flags['stop'] = args.stop or None
  if args.greedy:
    flags['temperature'] = 0.0
  tasks.run(args.workdir, args.task, args.data, overrides, args.step, flags, args.log_samples, params=args.params)
  return 0


def _sample_args(p):
  _workdir_args(p, 'sample from')
  p.add_argument('--prompt', default=None, help="prompt text (default: the config's sample.prompt)")
  p.add_argument('--prompt_file', default='', help='a file of prompts, one per line (sampled as one batch)')
  p.add_argument(
    '--max_new_tokens',
    type=int,
    default=None,
    help='beyond the model context, a sliding window (--config.sample.window_chunk) keeps going',
  )
  p.add_argument('--temperature', type=float, default=None, help='0 = greedy')
  p.add_argument('--top_k', type=int, default=None, help='0 = off')
  p.add_argument('--top_p', type=float, default=None, help='1 = off')
  p.add_argument('--min_p', type=float, default=None, help='0 = off')
  p.add_argument('--greedy', action='store_true', help='same as --temperature=0')
  p.add_argument('--num_samples', type=int, default=None, help='samples per prompt')
  p.add_argument('--beam_size', type=int, default=None, help='> 1 runs beam search')
  p.add_argument('--length_penalty', type=float, default=0.6, help="beam search's alpha")
  p.add_argument(
    '--stop',
    action='append',
    default=[],
    help="cut a sample before this text (repeatable; adds to the config's sample.stop)",
  )
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--format', choices=('text', 'jsonl'), default='text')
  p.add_argument(
    '--chat',
    action='store_true',
    help="each prompt is a user message, rendered with the model's chat template and its generation prompt",
  )


def _sample(args, overrides):
  from lmjax import sample  # pylint: disable=import-outside-toplevel

  hostenv.mark('imports')
  sample.run(args, overrides)
  hostenv.mark('done')
  return 0


def _bench_args(p):
  p.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  p.add_argument('--steps', type=int, default=30, help='timed steps after warm-up')
  p.add_argument('--record', default='', help='append the result as a JSON line to this file')
  p.add_argument(
    '--profile',
    nargs='?',
    const='profile',
    default='',
    metavar='DIR',
    help='write a jax.profiler trace of the timed steps to DIR (default ./profile; lmjax/profiling.py)',
  )


def _bench(args, overrides):
  from lmjax import bench, config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load(args.config, overrides)
  bench.run(config, args.steps, args.record, os.path.basename(args.config), profile_dir=args.profile)
  return 0


def _plan_args(p):
  p.add_argument('--config', required=True, help='configs/NAME.py[:variant], or a workdir (its recorded config)')
  p.add_argument(
    '--vocab_size',
    type=int,
    default=0,
    help="vocabulary to plan with when the config leaves model.vocab_size at 0 (= the tokenizer's); default the "
    "config's data.spm_vocab_size for a SentencePiece tokenizer, else 65 (tiny_shakespeare's characters)",
  )
  p.add_argument(
    '--devices',
    type=int,
    default=0,
    help="plan for this many simulated CPU devices instead of the machine's accelerators",
  )
  p.add_argument(
    '--topology',
    default='',
    help='compile for this TPU slice from any host (needs libtpu): v5e-16, v5p-64, v6e-8, v4-32, or v5e:4x4',
  )
  p.add_argument('--slices', type=int, default=1, help='with --topology: this many slices joined over DCN')
  p.add_argument(
    '--fit',
    nargs='?',
    const='batch',
    default='',
    choices=('batch', 'remat'),
    help='search what fits: the largest train.batch_size (default), or the least-recomputing model.remat',
  )
  p.add_argument('--json', action='store_true', help='print the plan as JSON (for scripts)')


def _plan(args, overrides):
  from lmjax import plan  # pylint: disable=import-outside-toplevel

  plan.run(args, overrides)
  return 0


def _schedule_args(p):
  p.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  p.add_argument('--points', type=int, default=11, help='steps to print, evenly spread (and each phase boundary)')
  p.add_argument('--png', default='', help='also plot the learning rate at every step into this PNG file')


def _schedule(args, overrides):
  from lmjax import config as config_lib, optim  # pylint: disable=import-outside-toplevel

  config = config_lib.load(args.config, overrides)
  if args.points < 2:
    raise ConfigError(f'--points must be >= 2, got {args.points}')
  oc, steps = config.optimizer, config.train.steps
  print(f'optimizer.schedule={oc.schedule!r} over train.steps={steps} (lr at the start of each step)')
  for step, lr in optim.schedule_points(oc, steps, args.points):
    print(f'step {step:>8}  lr {lr:.4e}')
  if args.png:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    curve = optim.schedule_points(oc, steps, min(steps, 2000))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([s for s, _ in curve], [lr for _, lr in curve])
    ax.set(xlabel='step', ylabel='learning rate', title=f'{os.path.basename(args.config)}: {oc.schedule}')
    fig.tight_layout()
    try:
      fig.savefig(args.png)
    except OSError as e:
      raise WorkdirError(f'--png {args.png}: cannot write it ({e.strerror}); give a writable path') from None
    print(f'wrote {args.png}')
  return 0


def _import_hf_args(p):
  p.add_argument(
    '--from',
    dest='source',
    required=True,
    help='a directory save_pretrained wrote (config.json, *.safetensors, tokenizer.json), or a hub name such as '
    'gpt2 on a machine with network access',
  )
  p.add_argument('--workdir', required=True, help='the new lmjax workdir to write')
  p.add_argument(
    '--adapter',
    default='',
    help='a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) trained over --from: the '
    'workdir is base + adapters (lora.rank > 0, train.init_from=hf:FROM)',
  )


def _import_hf(args, overrides):
  from lmjax import hf  # pylint: disable=import-outside-toplevel

  if args.adapter:
    from lmjax.hf import peft  # pylint: disable=import-outside-toplevel

    print(json.dumps(peft.import_adapter(args.source, args.adapter, args.workdir)))
    return 0
  print(json.dumps(hf.import_hf(args.source, args.workdir)))
  return 0


def _export_hf_args(p):
  _workdir_args(p, 'export')
  p.add_argument('--to', required=True, help='a new directory for config.json, model.safetensors and the tokenizer')
  p.add_argument(
    '--peft',
    action='store_true',
    help="a LoRA run's adapters, unmerged, as a PEFT adapter directory (default: the merged model)",
  )


def _export_hf(args, overrides):
  from lmjax import inference  # pylint: disable=import-outside-toplevel

  print(json.dumps(inference.export_hf(args.workdir, args.to, step=args.step, params=args.params, peft=args.peft)))
  return 0


def _sweep_args(p):
  p.add_argument('sweep', help='experiments/NAME.py: a sweep file (lmjax/sweep.py describes the format)')
  p.add_argument('--workdir', required=True, help="the sweep's folder: one workdir per member, then the results")
  p.add_argument('--dry-run', action='store_true', help='list the members, their overrides and state; train nothing')
  p.add_argument('--only', default='', metavar='GLOB', help='only the members whose name matches, e.g. "*/seed=0"')
  p.add_argument(
    '--emit',
    choices=('commands', 'slurm'),
    default='',
    help="train nothing: print each member's `lmjax train` line, or write WORKDIR/sweep.sbatch (a SLURM array)",
  )


def _sweep(args, overrides):
  from lmjax import sweep  # pylint: disable=import-outside-toplevel

  try:
    failed = sweep.run(args)
  except sweep.Stopped:
    return EXIT_PREEMPTED
  return EXIT_MEMBERS_FAILED if failed else 0


def _compare_args(p):
  p.add_argument('dirs', nargs='+', metavar='DIR', help='workdirs, or folders holding workdirs (searched below)')
  p.add_argument('--out', required=True, help='where results.csv, results.md and the plots go')
  p.add_argument('--baseline', default='', help='a workdir of the baseline variant (default: the first variant)')
  p.add_argument('--metrics', default='val_loss', help='comma-separated results to test against the baseline')
  p.add_argument('--alpha', type=float, default=0.05, help="a difference is real when Welch's p < alpha")


def _compare(args, overrides):
  from lmjax import results  # pylint: disable=import-outside-toplevel

  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise WorkdirError(f'--out {args.out} is a file; compare writes a folder of tables and plots: give a new path')
  return results.compare(args)


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list], int]
  # The command has written and closed everything when `run` returns, so the process may end at once: the
  # interpreter's teardown of JAX's runtime costs about half a second a command otherwise.
  quick_exit: bool = False
  # Why the command takes no --config.* overrides ('' when it does): it reads no config the overrides could change.
  refuses_overrides: str = ''


COMMANDS = {
  'train': Command('train (or resume) a run', _train_args, _train),
  'eval': Command(
    "evaluate a workdir's checkpoint: the eval split's loss, or tasks (multiple choice, perplexity, generation)",
    _eval_args,
    _eval,
    quick_exit=True,
  ),
  'sample': Command('sample text from a trained workdir', _sample_args, _sample, quick_exit=True),
  'bench': Command(
    'compile time, ms/step, tokens/s and MFU of a config (no data, no checkpoints)', _bench_args, _bench
  ),
  'plan': Command(
    'parameters, FLOPs and per-device memory of a config, without training', _plan_args, _plan, quick_exit=True
  ),
  'schedule': Command(
    "print (and plot) a config's learning rate over its steps, without training",
    _schedule_args,
    _schedule,
    quick_exit=True,
  ),
  'import-hf': Command(
    'a Hugging Face GPT-2 or Llama model (safetensors), or a PEFT adapter over one, as an lmjax workdir',
    _import_hf_args,
    _import_hf,
    quick_exit=True,
    refuses_overrides="the model's config.json decides it; change the rest when fine-tuning (train.init_from)",
  ),
  'export-hf': Command(
    "a workdir's checkpoint as a directory transformers' from_pretrained loads",
    _export_hf_args,
    _export_hf,
    quick_exit=True,
    refuses_overrides='export writes the run as it was trained',
  ),
  'sweep': Command(
    'train the members of a sweep file one after another, then compare them',
    _sweep_args,
    _sweep,
    refuses_overrides='a sweep sets its overrides in the sweep file, not on the command line',
  ),
  'compare': Command(
    'the table and plots of a sweep for any workdirs, grouping seeds',
    _compare_args,
    _compare,
    refuses_overrides='compare reads the configs the workdirs recorded',
  ),
}


# ---------------------------------------------------------------------------------------------- parsing, exit codes


def split_overrides(argv):
  """Pulls `--config.a.b=value` (or `--config.a.b value`) out of argv; the rest goes to argparse."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith('--config.'):
      body = a[len('--config.') :]
      if '=' not in body and i + 1 < len(argv):
        body, i = f'{body}={argv[i + 1]}', i + 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='lmjax', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')
  for name, command in COMMANDS.items():
    command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
  return p


def main(argv=None) -> int:
  as_command = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_overrides(argv)
  args = parser().parse_args(rest)  # --help and usage errors end here, before anything heavy is imported
  if as_command:  # a command, not a call from Python: restart with the allocator tuned (lmjax/hostenv.py)
    hostenv.reexec_tuned(['-m', 'lmjax', *argv])
  hostenv.tune_host_allocator()  # before JAX allocates anything
  hostenv.skip_absent_tpu()
  hostenv.mark('arguments parsed')
  command = COMMANDS[args.command]
  try:
    if overrides and command.refuses_overrides:
      raise UserError(f'--config.{overrides[0]}: {command.refuses_overrides}')
    code = command.run(args, overrides)
  except UserError as e:
    print(f'lmjax {args.command}: error: {one_line(e)}', file=sys.stderr)
    code = EXIT_USER_ERROR
  if as_command and command.quick_exit:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


if __name__ == '__main__':
  sys.exit(main())
