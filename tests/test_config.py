"""Config files and command-line overrides."""

import json

import pytest

from lmjax import cli, config as config_lib, workdir
from lmjax.errors import ConfigError


def test_overrides_are_parsed_to_the_field_type():
  c = config_lib.load(
    'configs/tiny.py',
    ['model.n_layers=3', 'optimizer.lr=0.01', 'model.use_bias=false', 'model.norm=rmsnorm', 'optimizer.lr=2e-3'],
  )
  assert (c.model.n_layers, c.optimizer.lr, c.model.use_bias, c.model.norm) == (3, 2e-3, False, 'rmsnorm')
  assert isinstance(c.optimizer.lr, float) and isinstance(c.model.n_layers, int)


def test_int_literal_for_a_float_field_stays_float():
  assert config_lib.load('configs/tiny.py', ['optimizer.lr=1']).optimizer.lr == 1.0


def test_unknown_key_names_the_closest_valid_keys():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'model.n_layer'.*model\.n_layers"):
    config_lib.load('configs/tiny.py', ['model.n_layer=3'])


def test_wrong_type_says_what_was_expected():
  with pytest.raises(config_lib.ConfigError, match=r"model.n_layers='three'.*expected int"):
    config_lib.load('configs/tiny.py', ['model.n_layers=three'])
  with pytest.raises(config_lib.ConfigError, match='expected bool'):
    config_lib.load('configs/tiny.py', ['model.use_bias=maybe'])


def test_variant_argument_selects_a_family_member():
  c = config_lib.load('configs/tiny.py:llama')
  assert (c.model.norm, c.model.positions, c.model.mlp, c.model.n_kv_heads) == ('rmsnorm', 'rope', 'swiglu', 2)


def test_missing_config_file_is_a_clear_error():
  with pytest.raises(config_lib.ConfigError, match='not found'):
    config_lib.load('configs/nope.py')


def test_loaded_config_is_locked_against_new_keys():
  c = config_lib.load('configs/tiny.py')
  with pytest.raises(AttributeError):
    c.model.n_layerz = 3


def test_saved_config_round_trips(tmp_path):
  c = config_lib.load('configs/shakespeare_char_cpu.py', ['train.steps=70'])
  workdir.save_config(c, str(tmp_path))
  back = config_lib.from_dict(json.loads((tmp_path / 'config.json').read_text()))
  assert back.to_dict() == c.to_dict()


def test_cli_reports_a_bad_override_without_a_traceback(capsys, tmp_path):
  code = cli.main(['train', '--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.train.stepz=5'])
  err = capsys.readouterr().err
  assert code == 2
  assert "unknown config key 'train.stepz'" in err and 'train.steps' in err and 'Traceback' not in err


def test_two_mesh_axes_of_minus_one_are_refused_when_the_config_loads():
  with pytest.raises(ConfigError, match=r'mesh.data and mesh.fsdp are both -1'):
    config_lib.load('configs/tiny.py', ['mesh.fsdp=-1'])
