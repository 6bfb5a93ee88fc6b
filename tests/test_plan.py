"""`lmjax plan`: every shipped config loads, validates and plans on CPU, compiling the program training runs."""

import pytest
from conftest import REPO

from lmjax import config as config_lib, data, plan

SHIPPED = sorted(p.name for p in (REPO / 'configs').glob('*.py'))


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_config_loads_validates_and_plans_on_cpu(name):
  config = config_lib.load(str(REPO / 'configs' / name))  # validated as it loads
  with config.unlocked():
    config.model.vocab_size = config.model.vocab_size or 65
    if config.train.batch_size % 8:  # the CPU recipes' 12 rows: planned on the one device they run on
      config.mesh.data = 1
  whole = name == 'tiny.py'  # one config planned whole (eval step, sampler, the estimate); the rest: the train step
  p = plan.plan(config, estimate=whole, train_only=not whole)
  assert p['n_params'] > 0 and p['train_step']['total'] > 0 and p['fits']
  if whole:
    assert p['eval_step']['total'] > 0 and p['sample_step']['total'] > 0
  assert p['batch_keys'] == sorted(data.TRAIN_KEYS[config.data.rows])  # packed configs: segments and positions too
