"""The shape of the code, checked by reading it: no import circle (function-level imports count), the config
near the bottom of the imports, and a training loop module of short functions."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'lmjax'


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports() -> dict[str, set[str]]:
  """{module: the lmjax modules it imports anywhere in its body}."""
  modules = {_module(p): p for p in PACKAGE.rglob('*.py')}
  out = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
        subs = {f'{node.module}.{a.name}' for a in node.names} & set(modules)
        found |= subs if len(subs) == len(node.names) else subs | {node.module}
    out[name] = {m for m in found if m in modules and m != name and m != 'lmjax'}
  return out


def test_no_module_imports_itself_back_through_others():
  graph = _imports()
  state = {}

  def visit(m, path):
    state[m] = 'open'
    for n in sorted(graph[m]):
      if state.get(n) == 'open':
        pytest.fail('import circle: ' + ' -> '.join(path[path.index(n) :] + [n]))
      if n not in state:
        visit(n, path + [n])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_the_config_imports_only_the_errors_and_the_eval_task_grammar():
  graph = _imports()
  assert graph['lmjax.config'] == {'lmjax.errors', 'lmjax.evals.spec'}
  assert graph['lmjax.evals.spec'] == {'lmjax.errors'}


def test_no_function_of_the_training_loop_is_longer_than_80_lines():
  for name in ('train.py', 'loop_parts.py'):
    tree = ast.parse((PACKAGE / name).read_text())
    long = [
      (n.name, n.end_lineno - n.lineno + 1)
      for n in ast.walk(tree)
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long, f'{name}: {long}'
