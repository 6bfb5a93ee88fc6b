"""`lmjax plan` (issue #4): placeholder until the scale-out work lands."""


def add_arguments(parser):
  parser.add_argument('--config', required=True)


def run(args, overrides):
  raise NotImplementedError('lmjax plan is not implemented yet')
