"""The one entry point: `lmjax {train,eval,sample,bench,plan} ...` (also `python -m lmjax`).

Flags and nothing else: every subcommand calls one function in a module that does the work.
`--config.a.b=value` overrides any config field (type-checked; unknown keys name the closest valid ones).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lmjax import hostenv  # the one lmjax import before the process is set up: it imports nothing heavy


def _user_errors():
  """Errors the user can fix: printed as one clear line, exit code 2, no traceback."""
  from lmjax import checkpoint, config, sample, sources, tokenizers
  return (config.ConfigError, sources.DataError, tokenizers.TokenizerError, checkpoint.CheckpointError,
          sample.SampleError)


def _split_overrides(argv):
  """Pulls `--config.a.b=value` (or `--config.a.b value`) out of argv; the rest goes to argparse."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith('--config.'):
      body = a[len('--config.'):]
      if '=' not in body and i + 1 < len(argv):
        body, i = f'{body}={argv[i + 1]}', i + 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _parser():
  p = argparse.ArgumentParser(prog='lmjax', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)

  def multihost(sp):
    g = sp.add_argument_group('multi-host (TPU VMs are auto-detected; GPU clusters and local tests pass these)')
    g.add_argument('--coordinator', default='', help='host:port of process 0')
    g.add_argument('--num_processes', type=int, default=0)
    g.add_argument('--process_id', type=int, default=-1)

  t = sub.add_parser('train', help='train (or resume) a run')
  t.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  t.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config; re-run to resume')
  multihost(t)

  e = sub.add_parser('eval', help="evaluate a workdir's latest checkpoint over the whole eval split")
  e.add_argument('--workdir', required=True)
  multihost(e)

  from lmjax import sample
  sample.add_arguments(sub.add_parser('sample', help='sample text from a trained workdir'))

  b = sub.add_parser('bench', help='compile time, ms/step, tokens/s and MFU of a config (no data, no checkpoints)')
  b.add_argument('--config', required=True)
  b.add_argument('--steps', type=int, default=30, help='timed steps after warm-up')
  b.add_argument('--record', default='', help='append the result as a JSON line to this file')
  from lmjax import plan
  plan.add_arguments(sub.add_parser('plan', help='parameters, FLOPs and per-device memory of a config, without training'))
  return p


def main(argv=None):
  if argv is None:  # a command, not a call from Python: restart with the allocator tuned (lmjax/hostenv.py)
    hostenv.reexec_tuned(['-m', 'lmjax', *sys.argv[1:]])
  from lmjax import runtime  # imports JAX
  runtime.tune_host_allocator()  # before JAX allocates anything
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  try:
    return _run(args, overrides)
  except _user_errors() as e:
    print(f'lmjax {args.command}: error: {e}', file=sys.stderr)
    return 2


def _run(args, overrides):
  from lmjax import config as config_lib, runtime
  if hasattr(args, 'coordinator'):
    runtime.init_distributed(args.coordinator, args.num_processes, args.process_id)
  if args.command == 'train':
    from lmjax import train
    train.train(config_lib.load(args.config, overrides), args.workdir)
  elif args.command == 'eval':
    from lmjax import train
    print(json.dumps(train.evaluate_run(args.workdir, overrides)))
  elif args.command == 'sample':
    from lmjax import sample
    sample.run(args, overrides)
  elif args.command == 'bench':
    from lmjax import bench
    bench.run(config_lib.load(args.config, overrides), args.steps, args.record, os.path.basename(args.config))
  elif args.command == 'plan':
    from lmjax import plan
    plan.run(args, overrides)
  return 0


if __name__ == '__main__':
  sys.exit(main())
