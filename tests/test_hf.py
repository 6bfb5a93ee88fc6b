"""Hugging Face interop: import GPT-2 and Llama checkpoints with exact parity, the 'hf' tokenizer, export back,
fine-tune on prompt/completion pairs, and the refusals (lmjax/hf/)."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ONE_DEVICE, REPO, load_tiny_hf, rows, tiny_overrides
from lmjax import data as data_lib, errors, hf, inference, sample, steps, tokenizers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXT = open(REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt', encoding='utf-8').read()


def _hf_logits(directory, ids_BxL):
  m = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return m(torch.tensor(np.asarray(ids_BxL, np.int64))).logits.numpy()


def _lmjax_logits(workdir, ids_BxL):
  _, _, engine, state = inference.load_run(workdir, ONE_DEVICE)
  return np.asarray(engine.model.apply({'params': state.params}, jnp.asarray(ids_BxL)))


def _real_text_ids(tok, rows_=3, length=48):
  """A batch of real text: rows of Tiny Shakespeare from different places in the play."""
  return np.stack([tok.encode(TEXT[i * 20_000 : i * 20_000 + 2_000])[:length] for i in range(rows_)])


@pytest.fixture(scope='module')
def imported(hf_models, tmp_path_factory):
  """Every test model imported once: {name: workdir}."""
  root = tmp_path_factory.mktemp('imported')
  out = {}
  for name, directory in hf_models.items():
    out[name] = str(root / name)
    hf.import_hf(directory, out[name])
  return out


@pytest.mark.parametrize('name', ['gpt2', 'gpt2_untied', 'llama', 'llama_tied'])
def test_imported_logits_and_50_greedy_tokens_equal_transformers(name, hf_models, imported):
  tok = tokenizers.load(imported[name])
  ids = _real_text_ids(tok)
  want = _hf_logits(hf_models[name], ids)
  got = _lmjax_logits(imported[name], ids)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1e-4
  config, _, engine, state = inference.load_run(imported[name], ONE_DEVICE)
  prompt = ids[0, :8]
  [ours] = sample.generate(state.params, engine.model_cfg, [prompt], max_new_tokens=50, temperature=0.0)
  m = transformers.AutoModelForCausalLM.from_pretrained(hf_models[name]).eval()
  with torch.no_grad():
    theirs = m.generate(
      torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
  assert list(ours) == theirs
  assert len(set(theirs)) > 3  # a model that repeats one token would make this comparison weak


def test_import_reads_the_hf_config_and_records_a_normal_workdir(imported, hf_models):
  config, tok, _, state = inference.load_run(imported['llama'], ONE_DEVICE)
  m = config.model
  assert (m.norm, m.positions, m.mlp, m.use_bias, m.tied_embeddings) == ('rmsnorm', 'rope', 'swiglu', False, False)
  assert (m.n_heads, m.n_kv_heads, m.rope_scaling, m.rope_theta, m.rope_original_max_len) == (4, 2, 'llama3', 5e5, 16)
  assert int(state.step) == 0 and state.opt_state is None
  spec = json.load(open(os.path.join(imported['llama'], 'tokenizer.json')))
  assert (spec['kind'], spec['bos_id'], spec['eos_id'], spec['adds_bos']) == ('hf', 1, 0, True)
  g = tokenizers.load(imported['gpt2'])
  assert (g.bos_id, g.eos_id, g.adds_bos) == (0, 0, False)  # GPT-2: <|endoftext|> is both
  assert json.load(open(os.path.join(hf_models['llama_tied'], 'model.safetensors.index.json')))  # really sharded


def test_the_hf_tokenizer_round_trips_and_encodes_as_transformers_does(hf_models, imported):
  theirs = transformers.AutoTokenizer.from_pretrained(hf_models['gpt2'])
  ours = tokenizers.load(imported['gpt2'])
  for text in (TEXT[:3000], 'héllo wörld ✓ 🙂\n\n  two  spaces\ttab', ''):
    ids = ours.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == theirs(text, add_special_tokens=False).input_ids
    assert ours.decode(ids) == text  # byte-level BPE: exact
  again = tokenizers.from_spec(ours.spec(), imported['gpt2'])
  assert again.spec() == ours.spec()
  with open(os.path.join(imported['gpt2'], 'hf_tokenizer.json'), 'a') as f:
    f.write(' ')  # a changed tokenizer file no longer matches the recorded sha256
  try:
    with pytest.raises(errors.TokenizerError, match='differs from the one recorded'):
      tokenizers.load(imported['gpt2'])
  finally:
    tokenizers.save(ours, imported['gpt2'])


def test_export_loads_in_transformers_with_the_same_logits(imported, tmp_path, trained):
  for name in ('gpt2_untied', 'llama'):
    out = str(tmp_path / name)
    inference.export_hf(imported[name], out)
    tok = tokenizers.load(imported[name])
    ids = _real_text_ids(tok)
    assert np.abs(_hf_logits(out, ids) - _lmjax_logits(imported[name], ids)).max() <= 1e-4
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs('To be', add_special_tokens=False).input_ids == tok.encode('To be').tolist()
  # A run trained in lmjax (GPT-2-shaped, exact GELU, char tokenizer): the model exports, its tokenizer cannot.
  out = str(tmp_path / 'trained')
  summary = inference.export_hf(trained, out)
  assert summary['architecture'] == 'GPT2LMHeadModel' and not summary['tokenizer']
  ids = tokenizers.load(trained).encode(TEXT[:32])[None]
  assert np.abs(_hf_logits(out, ids) - _lmjax_logits(trained, ids)).max() <= 1e-4


def test_export_names_what_hf_cannot_express(tmp_path, shakespeare_dirs):
  from lmjax import config as config_lib, workdir as workdir_lib

  config = config_lib.load('configs/tiny.py', tiny_overrides(*shakespeare_dirs) + ['model.norm=rmsnorm'])
  os.makedirs(tmp_path / 'run')
  workdir_lib.save_config(config, str(tmp_path / 'run'))
  workdir_lib.save_tokenizer(tokenizers.ByteTokenizer(), str(tmp_path / 'run'))
  with pytest.raises(errors.InteropError, match="GPT-2 needs model.norm='rmsnorm'.*Llama needs.*positions='learned'"):
    inference.export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('option', ['model.qk_norm=true', 'model.attn_softcap=30.0', 'model.final_softcap=15.0'])
def test_export_refuses_the_stability_options_gpt2_and_llama_do_not_have_in_one_line(option, tmp_path, capsys):
  from lmjax import cli, config as config_lib, workdir as workdir_lib

  for variant in ('configs/tiny.py', 'configs/tiny.py:llama'):
    if variant.endswith('llama') and 'qk_norm' in option:
      continue  # a Llama with QK-norm is a Qwen3, and exports as one (tests/test_hf_families.py)
    run = tmp_path / variant.replace('/', '_')
    os.makedirs(run)
    workdir_lib.save_config(config_lib.load(variant, [option]), str(run))
    workdir_lib.save_tokenizer(tokenizers.ByteTokenizer(), str(run))
    assert cli.main(['export-hf', f'--workdir={run}', f'--to={tmp_path / "out"}']) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    field = option.partition('=')[0]
    assert line.startswith('lmjax export-hf: error: this model has no Hugging Face class')
    assert re.search(f'GPT-2 needs [^;]*{field}=', line) and re.search(f'Llama needs [^;]*{field}=', line)
    assert not os.path.exists(tmp_path / 'out')


def _copy(src, dst, drop=()):
  shutil.copytree(src, dst)
  for name in drop:
    os.remove(os.path.join(dst, name))
  return str(dst)


def _rewrite_tensors(directory, change):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(directory, 'model.safetensors')
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path)


def test_bad_hf_directories_are_named_precisely(hf_models, tmp_path):
  gpt2 = hf_models['gpt2']
  bad = _copy(gpt2, tmp_path / 'arch')
  config = json.load(open(os.path.join(bad, 'config.json')))
  json.dump({**config, 'architectures': ['FalconForCausalLM']}, open(os.path.join(bad, 'config.json'), 'w'))
  with pytest.raises(
    errors.InteropError, match='FalconForCausalLM is not supported.*LlamaForCausalLM, Qwen2ForCausalLM'
  ):
    hf.import_hf(bad, str(tmp_path / 'w1'))

  missing = _copy(gpt2, tmp_path / 'missing')
  _rewrite_tensors(missing, lambda t: t.pop('transformer.h.1.mlp.c_fc.bias'))
  with pytest.raises(errors.InteropError, match=r'transformer.h.1.mlp.c_fc.bias is missing \(expected shape \[192\]\)'):
    hf.import_hf(missing, str(tmp_path / 'w2'))

  extra = _copy(gpt2, tmp_path / 'extra')
  _rewrite_tensors(extra, lambda t: t.update({'transformer.h.0.attn.extra_proj': np.zeros((3, 3), np.float32)}))
  with pytest.raises(errors.InteropError, match=r'transformer.h.0.attn.extra_proj is not a tensor'):
    hf.import_hf(extra, str(tmp_path / 'w3'))

  shaped = _copy(gpt2, tmp_path / 'shaped')
  _rewrite_tensors(shaped, lambda t: t.update({'transformer.wpe.weight': np.zeros((32, 48), np.float32)}))
  with pytest.raises(errors.InteropError, match=r'transformer.wpe.weight has shape \[32, 48\], expected \[64, 48\]'):
    hf.import_hf(shaped, str(tmp_path / 'w4'))

  pickled = _copy(gpt2, tmp_path / 'pickled', drop=['model.safetensors'])
  open(os.path.join(pickled, 'pytorch_model.bin'), 'wb').write(b'not opened')
  with pytest.raises(errors.InteropError, match='only pickled weights.*never unpickles.*safe_serialization=True'):
    hf.import_hf(pickled, str(tmp_path / 'w5'))
  for w in ('w1', 'w2', 'w3', 'w4', 'w5'):  # nothing written: the workdir is not even created
    assert not os.path.exists(tmp_path / w)


def test_completion_only_loss_ignores_the_prompt(imported):
  tok = tokenizers.load(imported['gpt2'])
  encode = data_lib.DocumentEncoder(tok)
  pair = {'prompt': 'Who is there?\n', 'completion': 'Nay, answer me.\n'}
  d = encode(pair)
  n_prompt = len(tok.encode(pair['prompt']))
  assert d['inputs'][0] == tok.bos_id and d['targets'][-1] == tok.eos_id
  assert d['weights'].tolist() == [0.0] * n_prompt + [1.0] * (len(d['targets']) - n_prompt)
  _, _, engine, state = inference.load_run(imported['gpt2'], ONE_DEVICE)
  batch = {k: jnp.asarray(v[None]) for k, v in d.items()}
  loss = lambda b: steps.loss_terms(state.params, engine.model, b)[0]
  base = loss(batch)
  changed = dict(batch, targets=batch['targets'].at[0, 1].set((batch['targets'][0, 1] + 7) % tok.vocab_size))
  assert float(loss(changed)) == float(base)  # a prompt token's target carries no weight
  changed = dict(batch, targets=batch['targets'].at[0, n_prompt + 1].set(5))
  assert float(loss(changed)) != float(base)


def test_jsonl_pairs_name_the_bad_line(tmp_path):
  from lmjax import sources

  path = tmp_path / 'pairs.jsonl'
  path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "answer": "b"}\n')
  with pytest.raises(errors.DataError, match=r"pairs.jsonl:3 has no string field 'completion' \(its keys: answer"):
    sources.JsonlPairs(str(path))
  path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
  with pytest.raises(errors.DataError, match=r'pairs.jsonl:2: not valid JSON'):
    sources.JsonlPairs(str(path))
  path.write_text('{"q": "a", "a": "b"}\n')
  assert sources.JsonlPairs(str(path), 'q', 'a')[0] == {'prompt': 'a', 'completion': 'b'}


def _pair_loss(directory, pairs):
  """Mean completion-token loss of a transformers model on prompt/completion pairs, computed by torch."""
  m = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  t = transformers.AutoTokenizer.from_pretrained(directory)
  total, count = 0.0, 0
  for p in pairs:
    prompt = t(p['prompt'], add_special_tokens=False).input_ids
    completion = t(p['completion'], add_special_tokens=False).input_ids
    ids = [t.bos_token_id] + prompt + completion + [t.eos_token_id]
    if len(ids) - 1 > m.config.n_positions:
      continue  # longer than the context (lmjax's packed rows split such a pair)
    with torch.no_grad():
      logp = torch.log_softmax(m(torch.tensor([ids[:-1]])).logits[0], -1)
    targets = torch.tensor(ids[1:])
    nll = -logp[torch.arange(len(targets)), targets][len(prompt) :]
    total, count = total + float(nll.sum()), count + len(nll)
  assert count > 200
  return total / count


def test_import_finetune_sample_export_through_the_cli(hf_models, tmp_path):
  """The README's flow: import-hf, train with init_from on a JSONL file, sample, export-hf; the exported model's
  loss on the pairs is lower than the original's, and greedy `lmjax sample` equals transformers' generate."""
  train_file, _ = load_tiny_hf().write_pairs(str(tmp_path / 'pairs'), TEXT, n_train=120, n_val=20)
  pairs = [json.loads(line) for line in open(train_file)][:40]
  env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
  run = lambda *args: subprocess.run(
    [sys.executable, '-m', 'lmjax', *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
  )
  src, base, ft, out = hf_models['gpt2'], str(tmp_path / 'base'), str(tmp_path / 'ft'), str(tmp_path / 'out')
  proc = run('import-hf', f'--from={src}', f'--workdir={base}')
  assert proc.returncode == 0, proc.stderr
  overrides = [
    f'--config.train.init_from={base}',
    f'--config.data.train_split={train_file}',
    f'--config.data.eval_split={train_file}',
    '--config.train.epochs=0',
    '--config.train.steps=20',
    '--config.train.eval_every=20',
    '--config.train.checkpoint_every=20',
    '--config.train.progress_bar=false',
    '--config.mesh.data=1',
  ]
  proc = run('train', '--config=configs/gpt2_finetune.py:tiny', f'--workdir={ft}', *overrides)
  assert proc.returncode == 0, proc.stderr
  assert [r['step'] for r in rows(ft) if 'val_loss' in r] == [20]
  proc = run('export-hf', f'--workdir={ft}', f'--to={out}')
  assert proc.returncode == 0, proc.stderr
  assert _pair_loss(out, pairs) < _pair_loss(src, pairs)

  proc = run('sample', f'--workdir={ft}', '--prompt=ROMEO:', '--max_new_tokens=12', '--greedy', '--format=jsonl')
  assert proc.returncode == 0, proc.stderr
  [line] = [json.loads(x) for x in proc.stdout.splitlines()]
  t = transformers.AutoTokenizer.from_pretrained(out)
  m = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  prompt = t('ROMEO:', return_tensors='pt').input_ids
  with torch.no_grad():
    g = m.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=t.eos_token_id)
  assert line['text'] == t.decode(g[0, prompt.shape[1] :], skip_special_tokens=True)

  # Training straight into the imported workdir is refused and changes nothing there.
  before = sorted(os.listdir(base))
  proc = run('train', '--config=configs/gpt2_finetune.py:tiny', f'--workdir={base}', *overrides)
  assert proc.returncode == 2 and 'holds an imported model' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert sorted(os.listdir(base)) == before


def test_init_from_hf_dir_and_epochs_set_the_run(hf_models, tmp_path, shakespeare_dirs):
  """hf:DIR converts in memory; the source decides the architecture; train.epochs decides train.steps."""
  from lmjax import config as config_lib, train

  train_file, val_file = load_tiny_hf().write_pairs(str(tmp_path / 'pairs'), TEXT, n_train=60, n_val=10)
  overrides = [
    f'train.init_from=hf:{hf_models["llama"]}',
    f'data.train_split={train_file}',
    f'data.eval_split={val_file}',
    'train.epochs=1',
    'train.progress_bar=false',
    *ONE_DEVICE,
  ]
  config = config_lib.load('configs/gpt2_finetune.py:tiny', overrides)
  with jax.default_device(jax.devices()[0]):
    train.train(config, str(tmp_path / 'ft'))
  recorded = json.load(open(tmp_path / 'ft' / 'config.json'))
  assert recorded['model']['norm'] == 'rmsnorm' and recorded['model']['rope_scaling'] == 'llama3'
  tok = tokenizers.load(str(tmp_path / 'ft'))
  encode = data_lib.DocumentEncoder(tok)
  tokens = sum(len(encode(json.loads(line))['inputs']) for line in open(train_file))
  rows_per_epoch = -(-tokens // recorded['model']['max_len'])
  assert recorded['train']['steps'] == -(-rows_per_epoch // config.train.batch_size)
  assert [r['step'] for r in rows(tmp_path / 'ft') if 'val_loss' in r][-1] == recorded['train']['steps']
  conflicting = config_lib.load('configs/gpt2_finetune.py:tiny', overrides + ['model.n_layers=3'])
  with pytest.raises(errors.ConfigError, match=r'decides the architecture.*model.n_layers=3 \(the source has 2\)'):
    train.train(conflicting, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x' / 'config.json')


def test_the_safetensors_reader_matches_the_library(hf_models, tmp_path):
  from safetensors.numpy import load_file
  from safetensors.torch import save_file

  directory = hf_models['llama_tied']  # sharded: several files and an index
  theirs = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.safetensors'):
      theirs.update(load_file(os.path.join(directory, name)))
  ours = hf.Tensors(directory)
  assert ours.names() == set(theirs) and len(theirs) > 10
  for name, x in theirs.items():
    assert ours.shape(name) == x.shape
    np.testing.assert_array_equal(ours.get(name), x)
  # half-precision weights come back as float32, value for value
  x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
  save_file({'h': x.half(), 'b': x.bfloat16()}, str(tmp_path / 'model.safetensors'))
  half = hf.Tensors(str(tmp_path))
  np.testing.assert_array_equal(half.get('h'), x.half().float().numpy())
  np.testing.assert_array_equal(half.get('b'), x.bfloat16().float().numpy())
  assert half.get('b').dtype == np.float32


@pytest.mark.parametrize('arch', list(hf.FAMILIES))
def test_every_family_in_the_table_round_trips_its_tensors_and_config(arch, hf_models):
  """The table is the only list of families: each has a test model, reads to parameters that write back to the
  file's own tensors bit for bit, and writes a config.json that reads back to the same model fields."""
  from lmjax.config import ModelConfig

  dirs = [d for d in hf_models.values() if hf.architecture(hf.read_hf_config(d)) == arch]
  assert dirs, f'{arch} is in hf.FAMILIES but no model in tests/conftest.py hf_models is one'
  family = hf.FAMILIES[arch]
  for directory in dirs:
    model = hf.read(directory)
    cfg = ModelConfig(**model.fields)
    theirs = hf.Tensors(directory)
    theirs.rename(family.rename(theirs.names()))
    ours = dict(hf.from_params(model.params, cfg, arch))
    assert all(n.endswith(family.IGNORED) for n in theirs.names() - set(ours))
    for name, x in ours.items():
      np.testing.assert_array_equal(x, theirs.get(name))
    assert hf.model_fields(hf.hf_config(cfg, model.tokenizer)) == model.fields


def test_an_architecture_outside_the_table_names_every_one_in_it():
  with pytest.raises(errors.InteropError) as e:
    hf.architecture({'architectures': ['NoSuchForCausalLM']})
  [line] = str(e.value).splitlines()
  assert line.startswith('architecture NoSuchForCausalLM is not supported; lmjax imports ')
  assert all(arch in line for arch in hf.FAMILIES)
