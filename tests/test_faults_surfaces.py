"""Bad input on the newer surfaces, through the real CLI (in process): fine-tune data, eval task files, sweep
files, compare, sample's prompt files and overrides beside train.init_from. Each case is one line
`lmjax CMD: error: ...` naming what was wrong, exit code 2, no traceback, and no training step taken. (Hugging
Face files, import-hf/export-hf and compare --out: test_faults_hf.py; planted cache entries: test_compiling.py.)"""

import json
import shutil

import pytest
from conftest import ONE_DEVICE, tiny_overrides

from lmjax import cli, config as config_lib, workdir as workdir_lib


def assert_one_line_error(argv, capsys, *fragments):
  """cli.main(argv) exits 2 with one error line holding every fragment; any other exception (a traceback)
  propagates and fails the test."""
  code = cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith(f'lmjax {argv[0]}: error: ')]
  assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  for f in fragments:
    assert f in lines[0], (f, lines[0])
  return lines[0]


def assert_not_trained(workdir):
  assert not (workdir / 'metrics.jsonl').exists() and not (workdir / 'checkpoints').exists()


def train_argv(workdir, *overrides):
  return ['train', '--config=configs/tiny.py', f'--workdir={workdir}', *(f'--config.{o}' for o in overrides)]


def write_jsonl(path, objs):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objs))
  return path


# ---------------------------------------------------------------------------------------------- fine-tune data

PAIR = {'prompt': 'Q: who? A:', 'completion': ' me'}
BAD_PAIRS = {
  'not JSON': (f'{json.dumps(PAIR)}\n{{"prompt": "x",\n', 'pairs.jsonl:2: not valid JSON'),
  'not an object': (f'{json.dumps(PAIR)}\n["x", "y"]\n', 'pairs.jsonl:2: expected a JSON object, got list'),
  'missing field': (json.dumps({'prompt': 'x'}) + '\n', "pairs.jsonl:1 has no string field 'completion'"),
  'wrong type': (json.dumps({'prompt': 'x', 'completion': 3}) + '\n', "pairs.jsonl:1 has no string field 'completion'"),
  'empty file': ('', 'hold no prompt/completion line'),
  'blank lines only': ('\n\n  \n', 'hold no prompt/completion line'),
  'not UTF-8': (b'{"prompt": "caf\xe9", "completion": "x"}\n', 'pairs.jsonl:1: not UTF-8'),
  'no file': (None, 'no files match'),
}


@pytest.mark.parametrize('case', list(BAD_PAIRS))
def test_bad_fine_tune_data_is_one_line_naming_the_file_and_line(case, tmp_path, capsys):
  content, fragment = BAD_PAIRS[case]
  bad = tmp_path / 'pairs.jsonl'
  if isinstance(content, bytes):
    bad.write_bytes(content)
  elif content is not None:
    bad.write_text(content)
  good = write_jsonl(tmp_path / 'good.jsonl', [PAIR] * 4)
  data = ['data.dataset=jsonl', 'data.rows=packed', f'data.train_split={bad}', f'data.eval_split={good}']
  assert_one_line_error(train_argv(tmp_path / 'run', *ONE_DEVICE, *data), capsys, fragment)
  assert_not_trained(tmp_path / 'run')


# ---------------------------------------------------------------------------------------------- eval task files


def _eval_task(case, tmp_path):
  """(train.eval_tasks entry, fragments of its error) for each kind of bad task file."""
  item = {'query': 'A', 'choices': ['b', 'c'], 'gold': 0}
  if case == 'mc missing':
    return f'mc:{tmp_path}/nowhere.jsonl', ["task 'nowhere'", f'{tmp_path}/nowhere.jsonl does not exist']
  if case == 'mc bad gold':
    path = write_jsonl(tmp_path / 'mc.jsonl', [item, {**item, 'gold': 5}])
    return f'mc:{path}', ["task 'mc'", f'{path}:2: gold 5 is out of range']
  if case == 'mc labels missing':
    path = write_jsonl(tmp_path / 'mc.jsonl', [item])
    return f'mc:{path},labels={tmp_path}/labels.txt', [f'labels={tmp_path}/labels.txt does not exist']
  if case == 'gen malformed':
    path = tmp_path / 'gen.jsonl'
    path.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a"\n')
    return f'gen:{path},name=qa', ["task 'qa'", f'{path}:2: not valid JSON']
  if case == 'gen wrong type':
    path = write_jsonl(tmp_path / 'gen.jsonl', [{'prompt': 'a', 'reference': 7}])
    return f'gen:{path}', [f'{path}:1: write {{"prompt": str, "reference": str or [str, ...]}}']
  if case == 'div not UTF-8':
    path = tmp_path / 'prompts.txt'
    path.write_bytes(b'once upon\nit was \xff\xfe\n')
    return f'div:{path}', ["task 'prompts'", f'{path}:2: not UTF-8 at byte 17']
  if case == 'div empty':
    path = tmp_path / 'prompts.txt'
    path.write_text('\n \n')
    return f'div:{path}', [f'{path} holds no prompt']
  assert case == 'ppl no files'
  return f'ppl:{tmp_path}/texts/*.txt', ["task 'texts'", 'no files match']


EVAL_CASES = ['mc missing', 'mc bad gold', 'mc labels missing', 'gen malformed', 'gen wrong type', 'div not UTF-8']
EVAL_CASES += ['div empty', 'ppl no files']


@pytest.mark.parametrize('case', EVAL_CASES)
def test_a_bad_eval_task_file_fails_before_training_starts(case, tmp_path, shakespeare_dirs, capsys):
  task, fragments = _eval_task(case, tmp_path)
  argv = train_argv(tmp_path / 'run', *tiny_overrides(*shakespeare_dirs), *ONE_DEVICE, f'train.eval_tasks=({task!r},)')
  assert_one_line_error(argv, capsys, 'train.eval_tasks', *fragments)
  assert_not_trained(tmp_path / 'run')


# ---------------------------------------------------------------------------------------------- init_from, sample


def test_an_override_at_its_default_value_is_not_dropped_for_the_init_from_sources(
  trained, tmp_path, shakespeare_dirs, capsys
):
  """model.n_layers=4 is ModelConfig's default and the source has 2: the explicit value is an error, not a silent
  switch to the source's 2 layers."""
  overrides = [*tiny_overrides(*shakespeare_dirs), *ONE_DEVICE, f'train.init_from={trained}', 'model.n_layers=4']
  assert config_lib.ModelConfig().n_layers == 4
  assert_one_line_error(train_argv(tmp_path / 'ft', *overrides), capsys, 'model.n_layers=4 (the source has 2)')
  assert_not_trained(tmp_path / 'ft')


@pytest.mark.parametrize('case', ['not UTF-8', 'blank', 'missing'])
def test_a_bad_prompt_file_is_one_line_naming_it(case, trained, tmp_path, capsys):
  path = tmp_path / 'prompts.txt'
  if case == 'not UTF-8':
    path.write_bytes('ROMEO:\nJULIET é\n'.encode('latin-1'))
  elif case == 'blank':
    path.write_text('\n\n')
  fragment = {
    'not UTF-8': 'not UTF-8 at byte 14 (line 2',
    'blank': 'holds no prompt',
    'missing': 'No such file',
  }[case]
  argv = ['sample', f'--workdir={trained}', f'--prompt_file={path}', '--max_new_tokens=4']
  assert_one_line_error(argv + [f'--config.{o}' for o in ONE_DEVICE], capsys, f'--prompt_file {path}', fragment)


# ---------------------------------------------------------------------------------------------- sweeps

BAD_SWEEPS = {
  'alpha not a number': ("alpha='0.05'", "Sweep.alpha must be a number in (0, 1), got '0.05'"),
  'metric not a name': ("metrics=('val_loss', 3)", 'Sweep.metrics must be a non-empty list of result names'),
  'product key not a key': ('product={1: (1, 2)}', "Sweep.product's keys must be config keys"),
  'variant key not a key': ("variants=({('model', 'norm'): 'rmsnorm'},)", "Sweep.variants' keys must be config keys"),
  'baseline not a variant': ('baseline=3', "Sweep.baseline must be a variant's name or its overrides"),
  'seeds empty': ('seeds=()', 'Sweep.seeds must be a non-empty list of ints'),
  'no get_sweep': (None, 'defines no get_sweep()'),
  'eval task file missing': (
    "overrides={'train.eval_tasks': ('mc:/nowhere/x.jsonl',)}",
    "member base/seed=0: train.eval_tasks task 'x' (mc:/nowhere/x.jsonl): /nowhere/x.jsonl does not exist",
  ),
}


@pytest.mark.parametrize('case', list(BAD_SWEEPS))
def test_a_bad_sweep_value_is_one_line_before_any_member_starts(case, tmp_path, capsys):
  field, fragment = BAD_SWEEPS[case]
  path = tmp_path / 's.py'
  body = f"  return Sweep(config='configs/tiny.py', {field})\n" if field else '  pass\n'
  path.write_text(f'from lmjax.sweep import Sweep\n\n\ndef get_{"sweep" if field else "other"}():\n{body}')
  line = assert_one_line_error(['sweep', str(path), f'--workdir={tmp_path / "run"}'], capsys, fragment)
  assert str(path) in line or 'member' in line  # the file, or the member whose config fails
  assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------------------------------------- compare


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir as a finished configs/tiny.py run records it (config and metrics written by hand)."""
  workdir = tmp_path_factory.mktemp('finished')
  workdir_lib.save_config(config_lib.load('configs/tiny.py'), str(workdir))
  rows = [{'step': s, 'time': 1e9 + s, 'train_loss': 3.0, 'tokens_per_sec': 1e3} for s in range(10, 70, 10)]
  rows.append({'step': 60, 'time': 1e9 + 61, 'val_loss': 2.0, 'val_bpb': 2.9})
  write_jsonl(workdir / 'metrics.jsonl', rows)
  return workdir


def _damaged(finished_run, tmp_path, file, content):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run, workdir)
  lines = (workdir / file).read_bytes().splitlines(keepends=True)
  (workdir / file).write_bytes(content(lines))
  return workdir


BAD_RUNS = {
  'row not an object': ('metrics.jsonl', lambda ls: b'[1, 2]\n' + b''.join(ls), 'line 1 is not a JSON object'),
  'row not JSON': ('metrics.jsonl', lambda ls: ls[0] + b'{"step": \n' + b''.join(ls[1:]), 'line 2 is not a JSON'),
  'row not UTF-8': ('metrics.jsonl', lambda ls: b'\xff\n' + b''.join(ls), 'line 1 is not a JSON object'),
  'row without a step': ('metrics.jsonl', lambda ls: b'{"time": 1}\n' + b''.join(ls), 'line 1: step must be numbers'),
  'loss not a number': (
    'metrics.jsonl',
    lambda ls: b''.join(ls) + b'{"step": 60, "time": 1, "val_loss": "low"}\n',
    "line 8: val_loss must be numbers, got {'val_loss': 'low'}",
  ),
  'config a list': ('config.json', lambda ls: b'[1]', 'config.json is not a recorded config'),
  'config of wrong type': ('config.json', lambda ls: b'{"train": {"steps": "many"}}', 'is not a recorded config'),
  'config not JSON': ('config.json', lambda ls: b'{"train": ', 'config.json cannot be read'),
}


@pytest.mark.parametrize('case', list(BAD_RUNS))
def test_compare_of_a_damaged_run_is_one_line_naming_the_file(case, finished_run, tmp_path, capsys):
  file, content, fragment = BAD_RUNS[case]
  workdir = _damaged(finished_run, tmp_path, file, content)
  argv = ['compare', str(workdir), f'--out={tmp_path / "out"}']
  assert_one_line_error(argv, capsys, str(workdir / file), fragment)


@pytest.mark.parametrize('case', ['no such path', 'no runs below', 'unfinished', 'metric', 'alpha', 'baseline'])
def test_compare_of_bad_paths_or_flags_is_one_line(case, finished_run, tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  runs = {'no such path': tmp_path / 'nowhere', 'no runs below': tmp_path / 'empty'}.get(case, finished_run)
  if case == 'unfinished':
    runs = _damaged(finished_run, tmp_path, 'metrics.jsonl', lambda ls: b''.join(ls[:3]))
  flags = {'metric': ['--metrics=val_loss,val_los'], 'alpha': ['--alpha=nan'], 'baseline': [f'--baseline={tmp_path}']}
  fragment = {
    'no such path': 'is not a directory',
    'no runs below': 'holds no workdir (no config.json in it or below)',
    'unfinished': 'none of the 1 runs found has reached its train.steps',
    'metric': "--metrics: unknown ['val_los']",
    'alpha': '--alpha=nan: a significance level is in (0, 1)',
    'baseline': 'is not one of the workdirs compared',
  }[case]
  argv = ['compare', str(runs), f'--out={tmp_path / "out"}', *flags.get(case, [])]
  assert_one_line_error(argv, capsys, fragment)
  assert not (tmp_path / 'out').exists()
