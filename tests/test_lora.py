"""LoRA (lmjax/lora.py) and PEFT adapters in and out (lmjax/hf/peft.py): adapters train over a frozen base, the
checkpoint holds them alone and names its base, and PEFT loads what lmjax writes (and the reverse) with the same
logits and greedy tokens."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import ONE_DEVICE, REPO, load_tiny_hf, rows
from lmjax import checkpoint, cli, config as config_lib, inference, lora, train

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TEXT = open(REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt', encoding='utf-8').read()


def _config(base, pairs, steps, *extra):
  overrides = [
    f'train.init_from=hf:{base}',
    f'data.train_split={pairs}',
    f'data.eval_split={pairs}',
    'train.epochs=0',
    f'train.steps={steps}',
    'train.eval_every=4',
    'train.checkpoint_every=4',
    'train.progress_bar=false',
    'train.eval_max_batches=1',
    'optimizer.lr=0.03',
    'optimizer.warmup_steps=0',
    'lora.rank=4',
    "lora.targets=('q','k','v','o','up','down')",
    *ONE_DEVICE,
    *extra,
  ]
  return config_lib.load('configs/lora_chat.py:tiny', overrides)


@pytest.fixture(scope='module')
def setup(hf_models, tmp_path_factory):
  """A GPT-2 base with a chat template (its own copy), conversations, and a LoRA run of 8 steps on them, saved at
  steps 4 and 8: the chat fine-tune of configs/lora_chat.py:tiny, shortened."""
  root = tmp_path_factory.mktemp('lora')
  base = str(root / 'base')
  shutil.copytree(hf_models['gpt2'], base)
  with open(os.path.join(base, 'chat_template.jinja'), 'w') as f:
    f.write(load_tiny_hf().CHAT_TEMPLATE)
  pairs, _ = load_tiny_hf().write_chats(str(root / 'chat'), TEXT, n_train=48, n_val=8)
  run = str(root / 'run')
  with jax.default_device(jax.devices()[0]):
    train.train(_config(base, pairs, 8, f'train.compilation_cache_dir={root / "cache"}'), run)
  return {'root': root, 'base': base, 'pairs': pairs, 'run': run}


def _peft_model(base, adapter):
  m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  return peft.PeftModel.from_pretrained(m, adapter).eval()


def _ours(workdir, tokenizer_dir):
  """(token ids, lmjax's logits of them, 16 greedy tokens after the first 8) of a workdir's merged model. Greedy
  decoding re-reads the whole row (one compiled shape; the model is causal, so the padding after it is unseen)."""
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  ids = np.stack([tok(TEXT[i * 9000 : i * 9000 + 400]).input_ids[:24] for i in range(2)])
  _, _, engine, state = inference.load_run(workdir, ONE_DEVICE)
  forward = jax.jit(lambda p, x: engine.model.apply({'params': p}, x))
  logits = np.asarray(forward(state.params, jnp.asarray(ids)))
  row = ids.copy()
  for t in range(8, 24):
    row[0, t] = int(np.argmax(np.asarray(forward(state.params, jnp.asarray(row)))[0, t - 1]))
  return ids, logits, row[0, 8:].tolist()


def _compare(ours, model, greedy=True):
  """lmjax's merged model (`_ours`) against a torch `model`: logits within 1e-4, the 16 greedy tokens equal."""
  ids, logits, tokens = ours
  with torch.no_grad():
    want = model(torch.tensor(ids.astype(np.int64))).logits.numpy()
    assert np.abs(logits - want).max() <= 1e-4
    if greedy:
      prompt = torch.tensor(ids[:1, :8].astype(np.int64))
      theirs = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
      assert tokens == theirs[0, 8:].tolist()


def test_lora_trains_the_adapters_alone_and_checkpoints_them_small(setup):
  losses = [r['train_loss'] for r in rows(setup['run']) if 'train_loss' in r]
  assert losses[-1] < losses[0]
  ckpt = checkpoint.Checkpointer(os.path.join(setup['run'], 'checkpoints'), data_iterator=False)
  stored = ckpt._mngr.item_metadata(8)['state']  # pylint: disable=protected-access
  ckpt.close()
  arrays = checkpoint._flat(getattr(stored, 'tree', stored))  # pylint: disable=protected-access
  names = sorted(arrays)
  params = [n for n in names if n.startswith('params/')]
  assert params and all(n.rsplit('/', 1)[1] in ('a', 'b') for n in params)
  assert all(n.rsplit('/', 1)[1] in ('a', 'b') for n in names if n.startswith('opt_state/') and '/mu/' in n)
  # Adapters + their two moments against the base's weights, array bytes both (the disk's blocks and the
  # checkpoint format's own files outweigh arrays this small): the base is never saved.
  state_bytes = sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for m in arrays.values())
  base = safetensors.numpy.load_file(os.path.join(setup['base'], 'model.safetensors'))
  base_bytes = sum(x.nbytes for x in base.values())
  assert state_bytes < base_bytes / 2, (state_bytes, base_bytes)  # a saved base alone would be base_bytes
  # The base is unchanged: the LoRA run at step 0 (B = 0) is the base, and sampling reads the base from disk.
  meta = json.load(open(os.path.join(setup['run'], 'config.json')))
  assert meta['lora']['rank'] == 4 and meta['train']['init_from'].startswith('hf:')
  assert os.path.exists(os.path.join(setup['run'], 'chat_template.jinja'))  # what sample --chat renders with


def test_a_resumed_lora_run_equals_the_uninterrupted_one_bitwise(setup, tmp_path):
  half = str(tmp_path / 'half')
  cache = f'train.compilation_cache_dir={setup["root"] / "cache"}'
  with jax.default_device(jax.devices()[0]):
    train.train(_config(setup['base'], setup['pairs'], 4, cache, 'optimizer.decay_steps=8'), half)
    train.train(_config(setup['base'], setup['pairs'], 8, cache), half)
  want = [r['train_loss'] for r in rows(setup['run']) if 'train_loss' in r]
  got = [r['train_loss'] for r in rows(half) if 'train_loss' in r]
  assert got[-1] == want[-1]


def test_resuming_over_another_base_is_refused_naming_both(setup, hf_models, tmp_path, capsys):
  other = str(tmp_path / 'other')  # the same shapes and tokenizer, other weights
  shutil.copytree(setup['base'], other)
  load_tiny_hf().model('gpt2', 300, seed=1, std=0.3).save_pretrained(other, safe_serialization=True)
  run = str(tmp_path / 'run')
  shutil.copytree(setup['run'], run)
  args = [
    'train',
    '--config=configs/lora_chat.py:tiny',
    f'--workdir={run}',
    f'--config.train.init_from=hf:{other}',
    f'--config.data.train_split={setup["pairs"]}',
    f'--config.data.eval_split={setup["pairs"]}',
    '--config.train.epochs=0',
    '--config.train.steps=12',
    '--config.lora.rank=4',
    "--config.lora.targets=('q','k','v','o','up','down')",
    '--config.mesh.data=1',
  ]
  capsys.readouterr()
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and setup['base'] in err and other in err
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['4', '8']  # nothing set aside as damaged


@pytest.mark.parametrize(
  'override, words',
  [
    ('lora.rank=-1', 'lora.rank must be > 0'),
    ("lora.targets=('q','qkv')", "unknown 'qkv'"),
    ("lora.targets=('q','gate')", "names 'gate', which matches nothing"),
  ],
)
def test_bad_lora_settings_are_one_line_errors(setup, override, words, capsys):
  args = [
    'train',
    '--config=configs/lora_chat.py:tiny',
    f'--workdir={setup["root"] / "bad"}',
    f'--config.train.init_from=hf:{setup["base"]}',
    f'--config.data.train_split={setup["pairs"]}',
    f'--config.data.eval_split={setup["pairs"]}',
    '--config.lora.rank=4',
    f'--config.{override}',
  ]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and words in err, err


def test_lora_needs_a_base(capsys):
  assert cli.main(['train', '--config=configs/tiny.py', '--workdir=/tmp/x', '--config.lora.rank=8']) == 2
  assert 'set train.init_from' in capsys.readouterr().err


def test_peft_loads_the_exported_gpt2_adapter_with_the_same_logits_and_greedy_tokens(setup, tmp_path, capsys):
  out = str(tmp_path / 'adapter')
  assert cli.main(['export-hf', f'--workdir={setup["run"]}', f'--to={out}', '--peft']) == 0
  summary = json.loads(capsys.readouterr().out)
  config = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert config['fan_in_fan_out'] and config['rank_pattern'] == {'attn.c_attn': 12}
  assert summary['step'] == 8
  ours = _ours(setup['run'], setup['base'])
  _compare(ours, _peft_model(setup['base'], out))
  # The merged export is the same model.
  merged = str(tmp_path / 'merged')
  assert cli.main(['export-hf', f'--workdir={setup["run"]}', f'--to={merged}']) == 0
  m = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
  _compare(ours, m, greedy=False)
  # Sampling it as a chat renders the prompt with the template the run kept.
  capsys.readouterr()
  assert (
    cli.main(['sample', f'--workdir={setup["run"]}', '--chat', '--prompt=Hi', '--max_new_tokens=2', '--greedy']) == 0
  )
  assert capsys.readouterr().out.startswith('Hi')


def _peft_adapter(base, out, targets, **kw):
  """A PEFT LoRA adapter over `base` with random A and B (B is zero at PEFT's init: nothing would be tested)."""
  m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
  model = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_' in name:
        p.normal_(0, 0.1)
  model.save_pretrained(out)
  return model.eval()


@pytest.mark.parametrize(
  'name, targets, kw',
  [
    ('gpt2', ['c_attn', 'c_proj'], {'fan_in_fan_out': True}),
    ('llama', ['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj'], {'rank_pattern': {'o_proj': 2}}),
  ],
)
def test_a_peft_adapter_imports_samples_and_exports_back_exactly(name, targets, kw, hf_models, tmp_path, capsys):
  base, adapter, workdir = hf_models[name], str(tmp_path / 'adapter'), str(tmp_path / 'w')
  theirs = _peft_adapter(base, adapter, targets, **kw)
  assert cli.main(['import-hf', f'--from={base}', f'--adapter={adapter}', f'--workdir={workdir}']) == 0
  capsys.readouterr()
  ours = _ours(workdir, base)
  _compare(ours, theirs)
  back = str(tmp_path / 'back')
  assert cli.main(['export-hf', f'--workdir={workdir}', f'--to={back}', '--peft']) == 0
  _compare(ours, _peft_model(base, back), greedy=False)  # the same adapter again, so the same logits suffice


def test_an_adapter_imported_into_its_own_directory_is_refused_and_changes_nothing(hf_models, tmp_path, capsys):
  adapter = str(tmp_path / 'adapter')
  _peft_adapter(hf_models['gpt2'], adapter, ['c_attn'], fan_in_fan_out=True)
  before = {f: os.path.getmtime(os.path.join(adapter, f)) for f in os.listdir(adapter)}
  assert cli.main(['import-hf', f'--from={hf_models["gpt2"]}', f'--adapter={adapter}', f'--workdir={adapter}']) == 2
  assert 'is the adapter directory being imported' in capsys.readouterr().err
  assert {f: os.path.getmtime(os.path.join(adapter, f)) for f in os.listdir(adapter)} == before


def test_an_adapter_whose_base_changed_is_refused_on_load(hf_models, tmp_path, capsys):
  base, adapter, workdir = str(tmp_path / 'base'), str(tmp_path / 'adapter'), str(tmp_path / 'w')
  shutil.copytree(hf_models['gpt2'], base)
  _peft_adapter(base, adapter, ['c_attn'], fan_in_fan_out=True)
  assert cli.main(['import-hf', f'--from={base}', f'--adapter={adapter}', f'--workdir={workdir}']) == 0
  load_tiny_hf().model('gpt2', 300, seed=3, std=0.3).save_pretrained(base, safe_serialization=True)
  assert cli.main(['sample', f'--workdir={workdir}', '--prompt=a', '--max_new_tokens=2']) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert 'belong to the base' in err and base in err


def test_lora_off_leaves_the_default_config_as_it_was():
  c = config_lib.default_config()
  assert c.lora.rank == 0 and not lora.enabled(c)
  assert not config_lib.problems(c)


def test_export_peft_of_a_model_without_adapters_is_refused(setup, tmp_path, capsys):
  from lmjax import hf  # pylint: disable=import-outside-toplevel

  hf.import_hf(setup['base'], str(tmp_path / 'w'))
  assert cli.main(['export-hf', f'--workdir={tmp_path / "w"}', f'--to={tmp_path / "x"}', '--peft']) == 2
  assert 'drop --peft' in capsys.readouterr().err


def test_gpt2_q_and_v_alone_export_as_one_block_diagonal_c_attn_adapter_and_read_back(hf_models, tmp_path):
  """Two of c_attn's three parts adapted: one PEFT adapter of rank 2r whose k rows are zero, scaled exactly."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from lmjax import hf, model as model_lib  # pylint: disable=import-outside-toplevel
  from lmjax.hf import families, peft as lmjax_peft  # pylint: disable=import-outside-toplevel

  base = hf_models['gpt2']
  fields, arch, _, params = hf.read(base)
  cfg = config_lib.ModelConfig(**{**dataclasses.asdict(config_lib.ModelConfig()), **fields})
  config = config_lib.default_config()
  config.lora.rank, config.lora.alpha, config.lora.targets = 2, 3.0, ('q', 'v')
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(
    lambda s: rng.normal(0, 0.2, s).astype(np.float32), lora.shapes(cfg, config), is_leaf=lambda x: isinstance(x, tuple)
  )
  out = str(tmp_path / 'adapter')
  lmjax_peft.write_adapter(out, adapters, cfg, config.lora, families.FAMILIES[arch], base)
  assert json.load(open(os.path.join(out, 'adapter_config.json')))['rank_pattern'] == {'attn.c_attn': 4}
  ids = np.arange(2 * 16).reshape(2, 16) % 300
  forward = jax.jit(lambda p: model_lib.Transformer(cfg).apply({'params': p}, ids))
  run = lambda a, s: np.asarray(forward(jax.jit(lambda a: lora.merge(params, a, cfg, s))(a)))
  ours = run(adapters, lora.scale(config))
  with torch.no_grad():
    theirs = _peft_model(base, out)(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  section, back = lmjax_peft.read_adapter(out, cfg, families.FAMILIES[arch])
  # c_attn is one module to PEFT: read back, k has an adapter too, of zeros
  assert section['targets'] == ['q', 'k', 'v'] and section['rank'] == 4
  assert not np.any(back['block_0']['k']['b'])
  assert np.abs(run(back, section['alpha'] / section['rank']) - ours).max() <= 1e-4


def test_lora_dropout_drops_adapter_inputs_with_a_key_and_never_without_one():
  cfg = config_lib.ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_len=8)
  config = config_lib.default_config()
  config.lora.rank, config.lora.dropout, config.lora.targets = 2, 0.5, ('q', 'up')
  params = {'block_0': {'attn': {'q_kernel': np.ones((16, 2, 8), np.float32)}, 'mlp': {'up_kernel': np.ones((16, 64))}}}
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(1), cfg, config))
  merge = jax.jit(lora.merge_fn(config, cfg))
  q = lambda p: np.asarray(p['block_0']['attn']['q_kernel'])
  full = q(jax.jit(lora.merge_fn(config, cfg))(params, adapters))
  one, other = q(merge(params, adapters, jax.random.key(2))), q(merge(params, adapters, jax.random.key(3)))
  assert not np.allclose(one, other) and not np.allclose(one, full)
  a, b = np.asarray(adapters['block_0']['q']['a']), np.asarray(adapters['block_0']['q']['b'])
  np.testing.assert_allclose(full, 1 + (lora.scale(config) * a @ b).reshape(16, 2, 8), atol=1e-6)
