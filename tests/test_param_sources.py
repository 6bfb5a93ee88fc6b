"""One reader of parameters (lmjax/param_sources.py): a workdir step, `best`, or an HF directory, the same for
sampling, evaluation, export and train.init_from."""

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE

from lmjax import cli, config as config_lib, hf, inference, param_sources
from lmjax.errors import ConfigError, WorkdirError


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_an_hf_directory_loads_the_parameters_its_import_holds(hf_models, tmp_path):
  hf.import_hf(hf_models['llama'], str(tmp_path / 'imported'))
  _, tok_a, _, direct = inference.load_run(f'hf:{hf_models["llama"]}', ONE_DEVICE)
  _, tok_b, _, imported = inference.load_run(str(tmp_path / 'imported'), ONE_DEVICE)
  assert tok_a.spec() == tok_b.spec() and int(direct.step) == int(imported.step) == 0
  for a, b in zip(_leaves(direct), _leaves(imported), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sample_and_eval_read_an_hf_directory_directly(hf_models, capsys):
  assert cli.main(['sample', f'--workdir=hf:{hf_models["gpt2"]}', '--prompt=To be', '--max_new_tokens=4']) == 0
  assert capsys.readouterr().out.startswith('To be')
  code = cli.main(['eval', f'--workdir=hf:{hf_models["gpt2"]}', '--step=3'])
  assert code == 2 and '--step=3 names a checkpoint of an lmjax run' in capsys.readouterr().err


def test_a_workdir_step_is_that_step_and_best_is_the_kept_one(trained):
  steps = sorted(int(s) for s in __import__('os').listdir(f'{trained}/checkpoints') if s.isdigit())
  source = param_sources.open_source(f'{trained}:{steps[0]}')
  config = source.config(ONE_DEVICE)
  _, _, engine, _ = inference.load_run(str(trained), ONE_DEVICE)
  assert int(source.state(engine, config).step) == steps[0]
  with pytest.raises(WorkdirError, match='is not a directory'):
    param_sources.open_source(f'{trained}-missing:best')


def test_init_from_adopts_the_architecture_and_refuses_a_conflicting_one(trained):
  source = param_sources.open_source(str(trained))
  config = config_lib.default_config()
  param_sources.adopt(source, config)
  assert {k: config.model[k] for k in config_lib.architecture_fields('learned')} == {
    k: source.model[k] for k in config_lib.architecture_fields('learned')
  }
  config = config_lib.default_config()
  config.model.n_layers = source.model['n_layers'] + 1
  with pytest.raises(ConfigError, match='decides the architecture.*model.n_layers'):
    param_sources.adopt(source, config)


def test_each_model_field_has_one_role():
  roles = {f: r for r in config_lib.ROLES for f in config_lib.fields(r)}
  assert sorted(roles) == sorted(config_lib.ModelConfig.__dataclass_fields__)
  assert 'd_model' in config_lib.fields(config_lib.ARCH) and 'dtype' in config_lib.fields(config_lib.RUNTIME)
  assert config_lib.architecture_fields('rope') + ('max_len',) == config_lib.architecture_fields('learned')
