"""Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 (text) in and out of lmjax, exactly: logits within 1e-4 of
transformers on tiny random models built here, 50 greedy tokens identical to `generate`, export -> from_pretrained
-> the same logits, the tokenizer's specials; and what lmjax cannot express refused before any array is read."""

import json
import os
import shutil
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILY_SHAPES, ONE_DEVICE, REPO, load_tiny_hf

from lmjax import errors, hf, inference, sample

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXT = open(REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt', encoding='utf-8').read()[:60_000]

ARCHITECTURES = {
  'qwen2': 'Qwen2ForCausalLM',
  'qwen3': 'Qwen3ForCausalLM',
  'mistral': 'MistralForCausalLM',
  'gemma2': 'Gemma2ForCausalLM',
  'gemma3': 'Gemma3ForCausalLM',
}


SHAPES = FAMILY_SHAPES


class Imported(NamedTuple):
  source: str  # the HF directory
  workdir: str  # its import
  run: tuple  # inference.load_run(workdir): (config, tokenizer, engine, state)
  ids: np.ndarray  # two rows of real text, 48 tokens each
  logits: np.ndarray  # lmjax's logits of them (one compile per family, shared by the tests)


@pytest.fixture(scope='module')
def families(hf_models, tmp_path_factory):
  """{family: Imported}: each tiny model of tests/conftest.py FAMILY_SHAPES, imported and run once."""
  root = tmp_path_factory.mktemp('families')
  out = {}
  for name in FAMILY_SHAPES:
    workdir = str(root / name)
    hf.import_hf(hf_models[name], workdir)
    run = inference.load_run(workdir, ONE_DEVICE)
    _, tok, engine, state = run
    ids = _ids(tok)
    logits = np.asarray(engine.model.apply({'params': state.params}, jnp.asarray(ids)))
    out[name] = Imported(hf_models[name], workdir, run, ids, logits)
  return out


def _hf_model(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32, attn_implementation='eager'
  ).eval()


def _hf_logits(directory, ids_BxL):
  with torch.no_grad():
    return _hf_model(directory)(torch.tensor(np.asarray(ids_BxL, np.int64))).logits.numpy()


def _ids(tok, rows=2, length=48):
  return np.stack([tok.encode(TEXT[i * 20_000 : i * 20_000 + 1_000])[:length] for i in range(rows)])


@pytest.mark.parametrize('name', SHAPES)
def test_imported_logits_and_50_greedy_tokens_equal_transformers(name, families):
  source, _, (_, _, engine, state), ids, got = families[name]
  assert json.load(open(os.path.join(source, 'config.json')))['architectures'] == [ARCHITECTURES[name]]
  want = _hf_logits(source, ids)
  assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
  prompt = ids[0, :8]
  [ours] = sample.generate(state.params, engine.model_cfg, [prompt], max_new_tokens=50, temperature=0.0)
  with torch.no_grad():
    theirs = (
      _hf_model(source)
      .generate(
        torch.tensor(prompt[None].astype(np.int64)),
        max_new_tokens=50,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )[0, len(prompt) :]
      .tolist()
    )
  assert list(ours) == theirs
  assert len(set(theirs)) > 3  # a model that repeats one token would make this comparison weak


@pytest.mark.parametrize('name', SHAPES)
def test_export_loads_in_transformers_as_the_same_architecture_with_the_same_logits(name, families, tmp_path):
  source, workdir, (_, tok, _, _), ids, ours = families[name]
  out = str(tmp_path / 'out')
  summary = inference.export_hf(workdir, out)
  assert summary['architecture'] == ARCHITECTURES[name] and summary['tokenizer']
  assert np.abs(_hf_logits(out, ids) - ours).max() <= 1e-4
  # the tokenizer: its ids and specials as transformers reads them, from the source and from the export
  for directory in (source, out):
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert (tok.bos_id, tok.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    text = 'To be, or not to be: that is the question.'
    assert tok.encode(text).tolist() == theirs(text, add_special_tokens=False).input_ids
  assert tok.adds_bos == (name in load_tiny_hf().BOS)


def _with_config(src, dst, **changes):
  """A copy of the model directory with config.json changed and weights no reader could parse: a refusal that comes
  from the config proves no array was read."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'config.json')
  config = json.load(open(path))
  config.update(changes)
  json.dump({k: v for k, v in config.items() if v is not None or k in changes}, open(path, 'w'))
  open(os.path.join(dst, 'model.safetensors'), 'wb').write(b'\0' * 64)
  return str(dst)


REFUSED = [
  ('qwen2', dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e6}), "rope scaling 'yarn'"),
  ('qwen2', dict(use_sliding_window=True), 'use_sliding_window=true'),
  ('qwen2', dict(architectures=['Qwen2MoeForCausalLM']), 'Qwen2MoeForCausalLM has mixture-of-experts layers'),
  ('qwen3', dict(attention_bias=True), 'attention_bias=true'),
  ('mistral', dict(hidden_act='gelu'), "hidden_act='gelu'"),
  ('gemma2', dict(layer_types=['full_attention', 'sliding_attention']), 'needs every Nth layer global'),
  ('gemma3', dict(architectures=['Gemma3ForConditionalGeneration']), 'has a vision tower'),
  ('gemma3', dict(attn_logit_softcapping=50.0), 'attn_logit_softcapping=50.0'),
  (
    'gemma3',
    dict(rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6}}),
    "rope scaling 'linear' of the full_attention layers",
  ),
]


@pytest.mark.parametrize('name, changes, message', REFUSED, ids=[f'{n}-{next(iter(c))}' for n, c, _ in REFUSED])
def test_what_lmjax_lacks_is_refused_from_the_config_before_any_array_is_read(
  name, changes, message, families, tmp_path
):
  bad = _with_config(families[name].source, tmp_path / 'bad', **changes)
  with pytest.raises(errors.InteropError, match=message.replace('(', r'\(')) as e:
    hf.import_hf(bad, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_an_lmjax_model_from_scratch_exports_as_the_family_its_options_make_it():
  from lmjax.config import ModelConfig
  from lmjax.hf import families as table

  base = dict(vocab_size=64, norm='rmsnorm', positions='rope', mlp='swiglu', use_bias=False)
  gemma = dict(base, mlp='geglu', norm_offset=True, embed_scale=True, post_norms=True, attn_window=8, global_every=2)
  cases = {
    'LlamaForCausalLM': base,
    'Qwen2ForCausalLM': dict(base, qkv_bias=True),
    'Qwen3ForCausalLM': dict(base, qk_norm=True, head_dim=16),
    'MistralForCausalLM': dict(base, attn_window=16),
    'Gemma2ForCausalLM': dict(gemma, attn_softcap=50.0),
    'Gemma3ForCausalLM': dict(gemma, qk_norm=True, rope_local_theta=1e4),
  }
  for arch, fields in cases.items():
    assert table.of_model(ModelConfig(**fields)).ARCHITECTURE == arch
  with pytest.raises(errors.InteropError, match='Mistral needs model.global_every=2'):
    table.of_model(ModelConfig(**dict(base, attn_window=16, global_every=2)))


# The config.json files of the hub models docs/huggingface.md names (their model fields, as the hub serves them):
# what each maps to, read without any weights.
HUB_CONFIGS = {
  'Qwen/Qwen2.5-0.5B': (
    dict(
      architectures=['Qwen2ForCausalLM'],
      hidden_act='silu',
      hidden_size=896,
      intermediate_size=4864,
      max_position_embeddings=32768,
      max_window_layers=24,
      model_type='qwen2',
      num_attention_heads=14,
      num_hidden_layers=24,
      num_key_value_heads=2,
      rms_norm_eps=1e-06,
      rope_theta=1000000.0,
      sliding_window=32768,
      tie_word_embeddings=True,
      use_sliding_window=False,
      vocab_size=151936,
    ),
    dict(qkv_bias=True, n_kv_heads=2, head_dim=0, tied_embeddings=True, rope_theta=1e6, attn_window=0),
  ),
  'Qwen/Qwen3-0.6B': (
    dict(
      architectures=['Qwen3ForCausalLM'],
      attention_bias=False,
      head_dim=128,
      hidden_act='silu',
      hidden_size=1024,
      intermediate_size=3072,
      max_position_embeddings=40960,
      max_window_layers=28,
      model_type='qwen3',
      num_attention_heads=16,
      num_hidden_layers=28,
      num_key_value_heads=8,
      rms_norm_eps=1e-06,
      rope_scaling=None,
      rope_theta=1000000,
      sliding_window=None,
      tie_word_embeddings=True,
      use_sliding_window=False,
      vocab_size=151936,
    ),
    dict(qk_norm=True, head_dim=128, tied_embeddings=True, attn_window=0),
  ),
  'mistralai/Mistral-7B-v0.1': (
    dict(
      architectures=['MistralForCausalLM'],
      hidden_act='silu',
      hidden_size=4096,
      intermediate_size=14336,
      max_position_embeddings=32768,
      model_type='mistral',
      num_attention_heads=32,
      num_hidden_layers=32,
      num_key_value_heads=8,
      rms_norm_eps=1e-05,
      rope_theta=10000.0,
      sliding_window=4096,
      tie_word_embeddings=False,
      vocab_size=32000,
    ),
    dict(attn_window=4096, global_every=0, n_kv_heads=8, tied_embeddings=False),
  ),
  'google/gemma-2-2b': (
    dict(
      architectures=['Gemma2ForCausalLM'],
      attention_bias=False,
      attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0,
      head_dim=256,
      hidden_act='gelu_pytorch_tanh',
      hidden_activation='gelu_pytorch_tanh',
      hidden_size=2304,
      intermediate_size=9216,
      max_position_embeddings=8192,
      model_type='gemma2',
      num_attention_heads=8,
      num_hidden_layers=26,
      num_key_value_heads=4,
      query_pre_attn_scalar=256,
      rms_norm_eps=1e-06,
      rope_theta=10000.0,
      sliding_window=4096,
      vocab_size=256000,
    ),
    dict(attn_window=4096, global_every=2, attn_softcap=50.0, final_softcap=30.0, head_dim=256, norm_offset=True),
  ),
  'google/gemma-3-1b-pt': (
    dict(
      architectures=['Gemma3ForCausalLM'],
      attention_bias=False,
      attn_logit_softcapping=None,
      final_logit_softcapping=None,
      head_dim=256,
      hidden_activation='gelu_pytorch_tanh',
      hidden_size=1152,
      intermediate_size=6912,
      max_position_embeddings=32768,
      model_type='gemma3_text',
      num_attention_heads=4,
      num_hidden_layers=26,
      num_key_value_heads=1,
      query_pre_attn_scalar=256,
      rms_norm_eps=1e-06,
      rope_local_base_freq=10000,
      rope_scaling=None,
      rope_theta=1000000,
      sliding_window=512,
      sliding_window_pattern=6,
      vocab_size=262144,
    ),
    dict(attn_window=512, global_every=6, rope_theta=1e6, rope_local_theta=1e4, head_dim=256, qk_norm=True),
  ),
}


@pytest.mark.parametrize('hub', HUB_CONFIGS)
def test_the_hub_configs_the_docs_name_map_to_their_options_and_back(hub):
  from lmjax.config import ModelConfig

  settings, want = HUB_CONFIGS[hub]
  fields = hf.model_fields(settings)
  assert {k: fields.get(k, getattr(ModelConfig(), k)) for k in want} == want
  cfg = ModelConfig(**fields)
  assert cfg.problems() == []
  exported = hf.hf_config(cfg)
  assert exported['architectures'] == settings['architectures']
  assert hf.model_fields(exported) == fields
