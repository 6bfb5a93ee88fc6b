"""The docs say what is true: every command in a fenced code block of README.md and docs/*.md runs as written.

A command is checked without doing its expensive work: `lmjax ...` (or `python -m lmjax ...`) is parsed by the CLI's
own parser, the config it names is loaded with its `--config.*` overrides and validated (a workdir's commands
validate the overrides on the defaults), eval tasks and sweep files are parsed and expanded, and the files it names
under configs/ and experiments/ exist. `python experiments/X.py --flag` must name a flag the script defines, and
`pip install '.[extra]'` an extra pyproject.toml defines. Cheap commands really run: `--help`, and `lmjax plan` of
configs/tiny.py. A typo fails with the doc file, the command and why.
"""

import contextlib
import io
import re
import shlex

import pytest
from conftest import REPO

from lmjax import cli, errors
from lmjax import config as config_lib

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
README_LIMIT = 12 * 1024  # bytes: the README is a first screen and a map; reference lives in docs/
PYTHONS = ('python', 'python3')
OPERATORS = ('&&', '||', ';', '|', '&')
REDIRECTS = ('>', '>>', '<', '2>', '2>&1')
CHECKED = re.compile(r'\blmjax\b|experiments/|configs/|pip install')
REPO_FILE = re.compile(r'(?:^|[=\s])((?:configs|experiments)/[\w./-]+\.(?:py|sh))')
REALLY_RUN_PLANS = ('configs/tiny.py', 'configs/tiny.py:llama')


# ---------------------------------------------------------------------------------------------- extraction


def shell_lines(text: str):
  """(line number, logical line) of every line in a fenced block that is not Python, continuations joined."""
  out, fence, pending, start = [], None, '', 0
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith('```'):
      fence = line.strip()[3:].strip() if fence is None else None
      continue
    if fence is None or fence in ('python', 'py', 'text', 'json', 'toml'):
      continue
    if not pending:
      start = number
    if line.endswith('\\'):
      pending += line[:-1] + ' '
      continue
    out.append((start, pending + line))
    pending = ''
  return out


def python_blocks(text: str):
  """(line number, code) of every ```python block."""
  out, code, start = [], None, 0
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip().startswith('```'):
      if code is not None:
        out.append((start, '\n'.join(code) + '\n'))
        code = None
      elif line.strip() == '```python':
        code, start = [], number
      continue
    if code is not None:
      code.append(line)
  return out


def split_commands(line: str) -> list[list[str]]:
  """The simple commands of a shell line (split at && ; | &), redirections dropped."""
  lex = shlex.shlex(line, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  commands, current, tokens = [], [], list(lex)
  i = 0
  while i < len(tokens):
    t = tokens[i]
    if t in OPERATORS:
      commands.append(current)
      current = []
    elif t in REDIRECTS:
      i += 1  # and its target
    else:
      current.append(t)
    i += 1
  commands.append(current)
  return [c for c in commands if c]


def doc_commands(path):
  """(line number, the line as written, one simple command's argv) for each command worth checking."""
  out = []
  for number, line in shell_lines(path.read_text()):
    if not CHECKED.search(line):
      continue
    try:
      commands = split_commands(line)
    except ValueError as e:  # an unclosed quote
      out.append((number, line, ['<unparsable>', str(e)]))
      continue
    for argv in commands:
      while argv and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', argv[0]):
        argv = argv[1:]  # FOO=1 lmjax ...: the environment, not the command
      if argv:
        out.append((number, line, argv))
  return out


# ---------------------------------------------------------------------------------------------- checking


def _parse(args):
  """(namespace, '') or (None, what argparse said); (None, None) when it printed --help and exited 0."""
  rest, overrides = cli.split_overrides(args)
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      ns = cli.parser().parse_args(rest)
  except SystemExit as e:
    if e.code == 0:
      return None, None, overrides
    said = [line for line in err.getvalue().splitlines() if line.strip()]
    return None, said[-1] if said else f'argparse exited {e.code}', overrides
  return ns, '', overrides


def _defaults_with(overrides):
  config = config_lib.default_config()
  config_lib.apply_overrides(config, overrides)
  return config_lib.validate(config)


def _check_sweep(ns, tmp_path):
  from lmjax import sweep as sweep_lib

  if '://' in ns.workdir:
    raise errors.SweepError('lmjax sweep needs a filesystem --workdir')
  sweep = sweep_lib.load(ns.sweep)
  members = sweep_lib.expand(sweep)
  sweep_lib.baseline(sweep, members)
  sweep_lib.select(members, ns.only)
  sweep_lib.check(sweep, members, str(tmp_path / 'sweep'))  # every member's config loads and validates


def _really_run(args) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(args)
  return '' if code == 0 and 'total' in out.getvalue() else f'exited {code}: {out.getvalue()[-300:]}'


def check_lmjax(args, tmp_path) -> str:
  """'' when `lmjax ARGS` would run as written, else why not."""
  ns, why, overrides = _parse(args)
  if ns is None:
    return why or ''  # --help ran
  command = cli.COMMANDS[ns.command]
  if overrides and command.refuses_overrides:
    return f'--config.{overrides[0]}: {command.refuses_overrides}'
  config_arg = getattr(ns, 'config', None)
  if config_arg and config_arg.partition(':')[0].endswith('.py'):
    config_lib.load(config_arg, overrides)
  else:  # a workdir's command (or plan of a workdir): the overrides must fit the schema
    _defaults_with(overrides)
  if ns.command == 'eval':
    from lmjax.evals import spec

    if ns.data and not ns.task:
      return '--data without a --task'
    spec.parse_all(ns.task, ns.data)
  elif ns.command == 'sweep':
    _check_sweep(ns, tmp_path)
  elif ns.command == 'compare':
    from lmjax import results

    return results.unknown_metrics(ns.metrics.split(','), '--metrics')
  elif ns.command == 'plan' and config_arg in REALLY_RUN_PLANS:
    return _really_run(args)
  return ''


def check_script(argv) -> str:
  """`python experiments/X.py --flag=...`: the script exists and defines each flag."""
  path = REPO / argv[0]
  if not path.is_file():
    return f'{argv[0]} does not exist'
  source = path.read_text()
  for a in argv[1:]:
    flag = a.partition('=')[0]
    if flag.startswith('--') and f"'{flag}'" not in source:
      return f'{argv[0]} defines no {flag}'
  return ''


def _extras() -> list[str]:
  """The names in pyproject.toml's [project.optional-dependencies] (no tomllib before Python 3.11)."""
  text = (REPO / 'pyproject.toml').read_text()
  section = text.split('[project.optional-dependencies]', 1)[1].split('\n[', 1)[0]
  return re.findall(r'^([A-Za-z0-9_-]+)\s*=', section, re.MULTILINE)


def check_pip(argv) -> str:
  extras = _extras()
  for a in argv:
    m = re.fullmatch(r'\.\[([\w,-]+)\]', a)
    for extra in m.group(1).split(',') if m else ():
      if extra not in extras:
        return f'pyproject.toml has no extra {extra!r} (it has {", ".join(extras)})'
  return ''


def check(argv, tmp_path) -> str:
  """'' when the command runs as written (or is not one of lmjax's to check), else why not."""
  if argv[0] == '<unparsable>':
    return argv[1]
  for name in REPO_FILE.findall(' '.join(argv)):
    if not (REPO / name.partition(':')[0]).exists():
      return f'{name} does not exist'
  try:
    if argv[0] == 'lmjax':
      return check_lmjax(argv[1:], tmp_path)
    if argv[0] in PYTHONS and argv[1:3] == ['-m', 'lmjax']:
      return check_lmjax(argv[3:], tmp_path)
    if argv[0] in PYTHONS and len(argv) > 1 and argv[1].endswith('.py'):
      return check_script(argv[1:])
    if argv[0] == 'pip' and 'install' in argv:
      return check_pip(argv)
  except errors.UserError as e:
    return f'{type(e).__name__}: {errors.one_line(e)}'
  return ''


# ---------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_docs_runs_as_written(doc, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # doc commands name configs/ and experiments/ from the repository root
  failures = []
  for number, line, argv in doc_commands(doc):
    why = check(argv, tmp_path)
    if why:
      failures.append(f'{doc.relative_to(REPO)}:{number}: {line.strip()}\n    {shlex.join(argv[:2])} ...: {why}')
  assert not failures, 'doc commands that do not run as written:\n' + '\n'.join(failures)


def test_the_sweep_files_the_docs_show_load_expand_and_validate(tmp_path, monkeypatch):
  from lmjax import sweep as sweep_lib

  monkeypatch.chdir(REPO)
  shown = [(doc, n, code) for doc in DOCS for n, code in python_blocks(doc.read_text()) if 'def get_sweep(' in code]
  assert shown, 'docs/sweeps.md shows a sweep file'
  for i, (doc, number, code) in enumerate(shown):
    path = tmp_path / f'sweep_{i}.py'
    path.write_text(code)
    try:
      sweep = sweep_lib.load(str(path))
      sweep_lib.check(sweep, sweep_lib.expand(sweep), str(tmp_path / f'runs_{i}'))
    except errors.UserError as e:
      pytest.fail(f'{doc.relative_to(REPO)}:{number}: the sweep file shown does not load: {errors.one_line(e)}')


def test_the_readme_has_its_two_set_up_commands_and_ci_runs_the_second():
  setup = [line for _, line in shell_lines((REPO / 'README.md').read_text()) if line.startswith('python3 -m venv')]
  ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines() if line.startswith('python3 -m venv')]
  assert len(setup) == 2, setup
  assert 'lmjax train' in setup[0] and 'lmjax sample' in setup[0], setup[0]
  assert ci == [setup[1]], 'README set-up command (b) and .ci/run must be the same line, byte for byte'


def test_the_readme_is_short_and_its_links_resolve():
  text = (REPO / 'README.md').read_text()
  size = len(text.encode())
  assert size <= README_LIMIT, f'README.md is {size} bytes; move reference material to docs/ (limit {README_LIMIT})'
  links = re.findall(r'\]\(([^)#\s]+)', text)
  assert any(link.startswith('docs/') for link in links)
  missing = [link for link in links if '://' not in link and not (REPO / link).exists()]
  assert not missing, f'README.md links to missing files: {missing}'


def test_the_extractor_sees_through_continuations_chains_comments_and_the_environment():
  text = """prose lmjax train is not a command
```bash
# a comment
FOO=1 lmjax train --config=configs/tiny.py \\
  --workdir=w   # trailing words
python3 -m venv .venv && . .venv/bin/activate && python -m lmjax eval --workdir=w > out.txt
```
```python
lmjax = 1
```
"""
  got = [argv for _, _, argv in doc_commands(_Text(text))]
  assert got == [
    ['lmjax', 'train', '--config=configs/tiny.py', '--workdir=w'],
    ['python3', '-m', 'venv', '.venv'],
    ['.', '.venv/bin/activate'],
    ['python', '-m', 'lmjax', 'eval', '--workdir=w'],
  ]


class _Text:
  """A stand-in for a doc file (doc_commands only reads it)."""

  def __init__(self, text):
    self.text = text

  def read_text(self):
    return self.text


TYPOS = [
  'lmjax trian --config=configs/tiny.py --workdir=w',
  'lmjax train --config=configs/tiny.py --workdir=w --config.train.stpes=3',
  'lmjax train --config=configs/tiny.py --workdir=w --config.model.norm=batchnorm',
  'lmjax train --config=configs/tiny.py --workdir=w --config.train.steps=many',
  'lmjax train --config=configs/tiny.py:gpt3 --workdir=w',
  'lmjax train --config=configs/nope.py --workdir=w',
  'lmjax train --workdir=w',
  'lmjax sample --workdir=w --tempreature=0.8',
  'lmjax sample --workdir=w --config.sample.top_kk=5',
  'lmjax eval --workdir=w --task=mc:f.jsonl,limt=5',
  'lmjax eval --workdir=w --task=mcq:f.jsonl',
  'lmjax eval --workdir=w --data=f.jsonl',
  'lmjax export-hf --workdir=w --to=o --config.seed=1',
  'lmjax sweep experiments/nope.py --workdir=w',
  "lmjax sweep experiments/norm_pos.py --workdir=w --only='*/seed=9'",
  'lmjax compare a --out=o --metrics=val_los',
  'lmjax plan --config=configs/tiny.py --config.mesh.data=0',
  'python experiments/tiny_hf.py --outt=x',
  'python experiments/tiny_hf2.py --out=x',
  'bash experiments/gpu_chek.sh',
  "pip install -e '.[tset]'",
  'lmjax eval --workdir=w --task="mc:f.jsonl',
]


@pytest.mark.parametrize('command', TYPOS)
def test_a_typo_in_a_doc_command_fails_and_says_why(command, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  found = doc_commands(_Text(f'```bash\n{command}\n```'))
  assert found, command
  assert any(check(argv, tmp_path) for _, _, argv in found), command
