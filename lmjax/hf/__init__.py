"""Hugging Face checkpoints in and out, as safetensors, with no torch: GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 2
and Gemma 3 (text); families.FAMILIES lists the classes.

`import_hf(DIR, WORKDIR)` reads a directory that `save_pretrained` wrote (config.json, model.safetensors or its
shards with model.safetensors.index.json, tokenizer.json) and writes a normal lmjax workdir: config.json, the
tokenizer (kind 'hf'), and a parameters-only checkpoint at step 0 that `lmjax sample`, `eval` and
`train.init_from` restore. `check_export` and `write_model` are the reverse, a directory `from_pretrained` loads
(`lmjax export-hf` is lmjax/inference.py `export_hf`: it reads the run, these write it).
`read(DIR)` is the reading half alone: (model fields, architecture, tokenizer, numpy parameters), nothing written.

  tensors.py   the safetensors reader: shard discovery, every header checked against its file, path checks
  hfconfig.py  config.json with typed reads that name the key when a value is missing or wrong
  families.py  THE table {architecture: family module}, and the generic steps that go through it
  gpt2.py      one module per family: config <-> ModelConfig fields, tensor names and shapes, norm and rope
  llama.py       rules, to_params / from_params, refusals of what lmjax lacks
  qwen2.py, qwen3.py, mistral.py, gemma2.py, gemma3.py
  layout.py    the tensors of the Llama-style decoders (all but GPT-2), and the options a family must leave off
  source.py    read(): a directory or hub name, checked in full, to fields + tokenizer + parameters
  convert.py   import_hf (an HF directory into an lmjax workdir), check_export / write_model (the reverse)
  peft.py      LoRA adapters as PEFT writes them: write_adapter (export-hf --peft), read_adapter, import_adapter

A family module holds NAME, ARCHITECTURE, MODEL_TYPE, IS (a phrase for messages), IGNORED (tensor-name endings
that hold nothing lmjax needs), and model_fields(HFConfig), mismatches(ModelConfig), hf_config(ModelConfig),
rename(names), expected(ModelConfig), to_params(get, ModelConfig), from_params(params, ModelConfig). Every tensor
is checked against the shape the config implies before anything is written: a missing, extra or mis-shaped tensor
is an error naming it and both shapes. Pickled pytorch_model.bin files are never opened.
"""

from lmjax.hf.convert import check_export, import_config, import_hf, write_model, write_tokenizer
from lmjax.hf.families import (
  ARCHITECTURES,
  FAMILIES,
  architecture,
  check_tensors,
  from_params,
  hf_config,
  model_fields,
  to_params,
)
from lmjax.hf.source import HFModel, read, read_hf_config, resolve_source
from lmjax.hf.tensors import INDEX, SAFETENSORS, Tensors

__all__ = [
  'ARCHITECTURES',
  'FAMILIES',
  'INDEX',
  'SAFETENSORS',
  'HFModel',
  'Tensors',
  'architecture',
  'check_tensors',
  'check_export',
  'write_model',
  'from_params',
  'hf_config',
  'import_config',
  'import_hf',
  'model_fields',
  'read',
  'read_hf_config',
  'resolve_source',
  'to_params',
  'write_tokenizer',
]
