"""Sampling specs: cached decoding equals the uncached model, each filter keeps what it should, sampling follows
softmax(logits / T), EOS and batching behave, beam search finds the best sequence, generation past the context
slides a window exactly as a plain cropped-window forward pass would, bad input is refused."""

import os
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import model as model_lib
from lmjax import beam, sample, tokenizers

jax.config.update('jax_numpy_rank_promotion', 'raise')

TINY = dict(vocab_size=17, max_len=32, n_layers=2, n_heads=4, d_model=32)


@functools.lru_cache(maxsize=None)
def _model(**overrides):
  """A random model whose logits vary a lot (GPT-2's 0.02 init makes every prompt predict the same token). Weights
  come from numpy over eval_shape's tree: eager per-leaf initialisation would compile dozens of tiny programs."""
  cfg = model_lib.ModelConfig(**{**TINY, **overrides}).validate()
  shapes = jax.eval_shape(lambda: model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(0)

  def leaf(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # norm scales around 1
    return jnp.asarray(base + 0.4 * rng.standard_normal(x.shape), jnp.float32)

  return cfg, jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes['params']))


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
  """Uncached reference: a full forward pass over a right-padded row (causal, so padding after the last real token
  cannot change its logits), one compiled shape for all lengths."""
  model = model_lib.Transformer(cfg)
  fwd = jax.jit(lambda params, row: model.apply({'params': params}, row[None])[0])

  def last_logits(params, toks):
    row = np.zeros((cfg.max_len,), np.int32)
    row[: len(toks)] = toks
    return np.asarray(fwd(params, row)[len(toks) - 1])

  return last_logits


def _uncached_greedy(cfg, params, prompt, n):
  last_logits, toks = _logits_fn(cfg), list(prompt)
  for _ in range(n):
    toks.append(int(np.argmax(last_logits(params, toks))))
  return toks[len(prompt) :]


PROMPTS = [
  np.array([3, 1, 4, 1, 5], np.int32),
  np.array([9, 2], np.int32),
  np.array([6, 5, 3, 5, 8, 9, 7, 9, 3], np.int32),
]

MODEL_OPTIONS = {
  'gpt2': {},
  'llama_gqa': dict(positions='rope', norm='rmsnorm', mlp='swiglu', n_kv_heads=2, use_bias=False),
  'mqa_untied': dict(n_kv_heads=1, tied_embeddings=False, mlp='swiglu'),
  'scan_rope_gqa': dict(scan_layers=True, positions='rope', n_kv_heads=2),
  'scan_learned_rms': dict(scan_layers=True, norm='rmsnorm'),
}


@pytest.mark.parametrize('name', sorted(MODEL_OPTIONS))
def test_cached_greedy_equals_uncached_argmax_for_every_model_option(name):
  cfg, params = _model(**MODEL_OPTIONS[name])
  got = sample.generate(params, cfg, PROMPTS, max_new_tokens=6, temperature=0)
  assert got == [_uncached_greedy(cfg, params, p, 6) for p in PROMPTS]


def test_staged_cache_equals_one_full_cache():
  # 16 padded prompt slots + 70 new tokens: a 64-slot stage, then the 85-slot last one, crossed mid-decode.
  cfg, params = _model(max_len=90, positions='rope')
  assert sample._stage_sizes(16, 16 + 70 - 1, staged=True) == [64, 85]
  kw = dict(max_new_tokens=70, temperature=0.9, top_k=5, seed=3)
  assert sample.generate(params, cfg, PROMPTS[:2], **kw) == sample.generate(
    params, cfg, PROMPTS[:2], staged=False, **kw
  )


def test_batched_prompts_of_different_lengths_equal_one_by_one():
  cfg, params = _model()
  batched = sample.generate(params, cfg, PROMPTS, max_new_tokens=5, temperature=0)
  assert batched == [sample.generate(params, cfg, [p], max_new_tokens=5, temperature=0)[0] for p in PROMPTS]


# ------------------------------------------------------------------------------------------ filters


PROBS = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)  # sorted: 0.5 (id 1), 0.2 (3), 0.15 (4), 0.1 (2), 0.05 (0)


def _kept(**kw):
  out = sample.filter_logits(jnp.log(jnp.asarray(PROBS))[None], **kw)[0]
  return set(np.flatnonzero(np.asarray(out) > -1e29).tolist())


@pytest.mark.parametrize(
  'top_p, kept', [(0.45, {1}), (0.69, {1, 3}), (0.71, {1, 3, 4}), (0.86, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(top_p, kept):
  assert _kept(top_p=top_p) == kept


def test_top_k_min_p_and_their_composition_keep_the_expected_sets():
  assert _kept(top_k=2) == {1, 3}
  assert _kept(min_p=0.35) == {1, 3}  # p >= 0.35 * 0.5
  assert _kept(min_p=0.25) == {1, 3, 4}
  # top-p applies to the top-k renormalised: {0.5, 0.2} -> {0.714, 0.286}
  assert _kept(top_k=2, top_p=0.75) == {1, 3}
  assert _kept(top_k=2, top_p=0.70) == {1}
  # temperature sharpens before top-p: at T=0.5 the probabilities are ~{0.73, 0.12, 0.07, ...}
  assert _kept(temperature=0.5, top_p=0.8) == {1, 3}


def _first_token_counts(cfg, params, n, **kw):
  rows = sample.generate(params, cfg, [PROMPTS[0]], max_new_tokens=1, num_return_sequences=n, **kw)
  return np.bincount([r[0] for r in rows], minlength=cfg.vocab_size)


def _chi_square(counts, probs):
  """Pearson's statistic over bins with expected count >= 5 (the rest pooled) and its degrees of freedom."""
  expected = probs * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum()) - 1


# Chi-square critical values at p = 0.001 by degrees of freedom (a fixed seed makes the test deterministic).
_CHI2_999 = {
  1: 10.83,
  2: 13.82,
  3: 16.27,
  4: 18.47,
  5: 20.52,
  6: 22.46,
  7: 24.32,
  8: 26.12,
  9: 27.88,
  10: 29.59,
  11: 31.26,
  12: 32.91,
  13: 34.53,
  14: 36.12,
  15: 37.70,
  16: 39.25,
}


def test_sampling_frequencies_match_softmax_of_logits_over_temperature():
  cfg, params = _model()
  logits = _logits_fn(cfg)(params, PROMPTS[0])
  probs = np.asarray(jax.nn.softmax(logits / 1.5))
  counts = _first_token_counts(cfg, params, 4000, temperature=1.5, seed=0)
  stat, dof = _chi_square(counts, probs)
  assert dof >= 3 and stat < _CHI2_999[dof], (stat, dof, counts, probs)
  # The check can fail: the same samples do not fit the untempered distribution.
  stat_wrong, _ = _chi_square(counts, np.asarray(jax.nn.softmax(logits)))
  assert stat_wrong > _CHI2_999[dof]


def test_top_k_never_emits_a_token_outside_the_k_most_likely_and_renormalises():
  cfg, params = _model()
  logits = _logits_fn(cfg)(params, PROMPTS[0])
  top4 = np.argsort(-logits)[:4]
  counts = _first_token_counts(cfg, params, 3000, temperature=2.0, top_k=4, seed=1)
  assert set(np.flatnonzero(counts)) <= set(top4.tolist())
  probs = np.zeros_like(logits)
  probs[top4] = np.asarray(jax.nn.softmax(logits[top4] / 2.0))
  stat, dof = _chi_square(counts, probs)
  assert stat < _CHI2_999[dof], (stat, counts, probs)


def test_same_seed_same_samples_different_seed_different_samples():
  cfg, params = _model()
  kw = dict(max_new_tokens=8, temperature=1.0, num_return_sequences=2)
  a = sample.generate(params, cfg, PROMPTS[:2], seed=7, **kw)
  assert a == sample.generate(params, cfg, PROMPTS[:2], seed=7, **kw)
  assert a != sample.generate(params, cfg, PROMPTS[:2], seed=8, **kw)
  assert a[0] != a[1]  # the return sequences of one prompt are independent draws


# ------------------------------------------------------------------------------------------ EOS and beams


def _run_program(cfg, params, st, prompts, max_new, done=None):
  """The compiled program itself on left-padded prompts (what generate() builds), before any truncation."""
  P = max(len(p) for p in prompts)
  tokens, segs = np.zeros((len(prompts), P), np.int32), np.zeros((len(prompts), P), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, P - len(p) :], segs[r, P - len(p) :] = p, 1
  lens = np.array([len(p) for p in prompts], np.int32)
  done = np.zeros((len(prompts),), bool) if done is None else np.asarray(done)
  out, _ = sample._compiled(cfg, max_new, st, None, None)(
    params, tokens, segs, lens, done, jax.random.key(0), 1.0, 1.0, 0.0, 0.6
  )
  return np.asarray(out).tolist()


def _static(**kw):
  return sample._Static(
    **{**dict(greedy=True, top_k=0, use_top_p=False, use_min_p=False, eos_id=None, beam_size=0, staged=True), **kw}
  )


def test_eos_stops_the_row_and_pads_the_rest():
  cfg, params = _model()
  greedy = [_uncached_greedy(cfg, params, p, 8) for p in PROMPTS]
  eos = greedy[0][2]  # row 0 emits it at step 2 at the latest
  stop = greedy[0].index(eos)
  got = _run_program(cfg, params, _static(eos_id=eos), PROMPTS, 8)
  for g, row in zip(greedy, got):  # finished rows are padded with EOS; the others run on untouched
    n = g.index(eos) + 1 if eos in g else 8
    assert row == g[:n] + [eos] * (8 - n)
  assert got[0] == greedy[0][: stop + 1] + [eos] * (7 - stop)
  # generate() cuts each row after its EOS.
  assert sample.generate(params, cfg, PROMPTS[:1], max_new_tokens=8, temperature=0, eos_id=eos) == [
    greedy[0][: stop + 1]
  ]


def test_beam_search_of_width_one_equals_greedy():
  cfg, params = _model()
  # generate() routes beam_size=1 to the greedy sampler, so run the beam-search program at width 1 directly.
  got = _run_program(cfg, params, _static(greedy=False, beam_size=1), PROMPTS, 6)
  assert got == [_uncached_greedy(cfg, params, p, 6) for p in PROMPTS]


def _brute_force_best(cfg, params, prompt, n, eos, alpha):
  """Every continuation of n tokens (or ending at EOS earlier), scored as beam search scores finished beams."""
  last_logits, best = _logits_fn(cfg), (-math.inf, None)
  for seq in itertools.product(range(cfg.vocab_size), repeat=n):
    if eos is not None and eos in seq:
      seq = seq[: seq.index(eos) + 1]
    lp = sum(
      float(jax.nn.log_softmax(last_logits(params, list(prompt) + list(seq[:i])))[seq[i]]) for i in range(len(seq))
    )
    score = lp / beam.length_penalty_factor(len(seq), alpha)
    best = max(best, (score, list(seq)))
  return best[1]


@pytest.mark.parametrize('eos, alpha', [(None, 0.6), (0, 0.6), (0, 2.0)])
def test_beam_search_returns_the_highest_scoring_sequence(eos, alpha):
  cfg, params = _model(vocab_size=4)
  prompt = np.array([1, 2], np.int32)
  # 16 beams hold every 2-token prefix of a 4-symbol vocabulary, so the search is exhaustive.
  got = sample.generate(params, cfg, [prompt], max_new_tokens=3, beam_size=16, eos_id=eos, length_penalty=alpha)
  assert got[0] == _brute_force_best(cfg, params, prompt, 3, eos, alpha)


# ------------------------------------------------------------------------------------------ sliding window


def _sliding_greedy_reference(cfg, params, prompt, n, chunk):
  """The sliding schedule written plainly: each chunk starts from the last max_len - chunk tokens of the row and
  appends `chunk` argmax tokens, each from a full uncached forward pass over that chunk's window so far."""
  last_logits, toks, new = _logits_fn(cfg), list(prompt), []
  while len(new) < n:
    window = toks[-(cfg.max_len - chunk) :]
    for _ in range(min(chunk, n - len(new))):
      tok = int(np.argmax(last_logits(params, window)))
      window.append(tok)
      toks.append(tok)
      new.append(tok)
  return new


SLIDE = dict(max_len=16)  # 3 prompts x 40 new tokens: chunks of 4 from windows of 12, 10 chunks per row


def test_sliding_window_greedy_equals_a_forward_pass_over_each_cropped_window():
  cfg, params = _model(**SLIDE)
  long_prompt = np.arange(20, dtype=np.int32) % 17  # longer than max_len: only its last 12 tokens count
  prompts = PROMPTS + [long_prompt]
  got = sample.generate(params, cfg, prompts, max_new_tokens=40, temperature=0)
  assert got == [_sliding_greedy_reference(cfg, params, p, 40, 4) for p in prompts]
  # A batched prompt gets the same tokens as alone (the schedule does not depend on the batch's longest prompt).
  assert got[1] == sample.generate(params, cfg, [PROMPTS[1]], max_new_tokens=40, temperature=0)[0]
  # Chunks of 1 are nanoGPT's crop-every-token decoding.
  assert sample.generate(params, cfg, PROMPTS[:1], max_new_tokens=20, temperature=0, window_chunk=1) == [
    _sliding_greedy_reference(cfg, params, PROMPTS[0], 20, 1)
  ]


def test_sliding_window_runs_every_chunk_on_one_compiled_program():
  cfg, params = _model(**SLIDE)
  sample.generate(params, cfg, PROMPTS, max_new_tokens=40, temperature=0.8, top_k=5, num_return_sequences=2)
  st = sample._Static(greedy=False, top_k=5, use_top_p=False, use_min_p=False, eos_id=None, beam_size=0, staged=True)
  assert sample._compiled(cfg, 4, st, None, None)._cache_size() == 1  # pylint: disable=protected-access


def test_sliding_window_same_seed_same_samples_and_each_chunk_draws_fresh_randomness():
  cfg, params = _model(**SLIDE)
  kw = dict(max_new_tokens=40, temperature=1.0, num_return_sequences=2)
  a = sample.generate(params, cfg, PROMPTS[:2], seed=5, **kw)
  assert a == sample.generate(params, cfg, PROMPTS[:2], seed=5, **kw)
  assert a != sample.generate(params, cfg, PROMPTS[:2], seed=6, **kw)
  assert all(len(row) == 40 for row in a) and a[0] != a[1]
  # A model with all-zero weights predicts uniform logits, so each token is the random draw alone: if the chunks
  # shared one key, every chunk of 4 would repeat the first.
  zeros = jax.tree.map(jnp.zeros_like, params)
  row = sample.generate(zeros, cfg, PROMPTS[:1], max_new_tokens=40, temperature=1.0, seed=5)[0]
  assert len({tuple(row[i : i + 4]) for i in range(0, 40, 4)}) > 1


def test_eos_in_an_early_chunk_keeps_the_row_finished_while_others_slide_on():
  cfg, params = _model(**SLIDE)
  refs = [_sliding_greedy_reference(cfg, params, p, 40, 4) for p in PROMPTS[:2]]
  eos = next(t for t in refs[0][:4] if t not in refs[1][:8])  # row 0 stops in chunk 0, row 1 runs on past chunk 1
  stop1 = refs[1].index(eos) + 1 if eos in refs[1] else 40
  got = sample.generate(params, cfg, PROMPTS[:2], max_new_tokens=40, temperature=0, eos_id=eos)
  assert got == [refs[0][: refs[0].index(eos) + 1], refs[1][:stop1]]
  # The mechanism: a row that enters a chunk finished emits only EOS, even though its window would continue.
  greedy = _run_program(cfg, params, _static(eos_id=eos), PROMPTS[:2], 4, done=[True, False])
  assert greedy[0] == [eos] * 4 and greedy[1] == _run_program(cfg, params, _static(eos_id=eos), PROMPTS[:2], 4)[1]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  'kw, message',
  [
    (
      dict(max_new_tokens=30, sliding_window=False),
      r'prompt \(9 tokens\) \+ max_new_tokens \(30\) = 39 exceeds .*max_len=32 and sliding_window=False',
    ),
    (dict(max_new_tokens=30, beam_size=2), r'= 39 exceeds .*max_len=32 and beam search .* cannot slide'),
    (dict(max_new_tokens=30, window_chunk=32), r'window_chunk must be in \[1, max_len=32\), got 32'),
    (dict(max_new_tokens=4, top_p=0.0), r'top_p must be in \(0, 1\]'),
    (dict(max_new_tokens=4, top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(max_new_tokens=4, top_k=-1), r'top_k must be >= 1'),
    (dict(max_new_tokens=4, temperature=-0.5), r'temperature must be >= 0'),
    (dict(max_new_tokens=4, min_p=1.5), r'min_p must be in \[0, 1\]'),
    (dict(max_new_tokens=4, beam_size=2, num_return_sequences=3), r'at most beam_size=2'),
    (dict(max_new_tokens=4, num_return_sequences=10**8), r'KV cache for 300000000 rows .* GiB, over the'),
  ],
)
def test_bad_options_raise_sample_error_saying_what_is_wrong(kw, message):
  cfg, params = _model()
  with pytest.raises(sample.SampleError, match=message):
    sample.generate(params, cfg, PROMPTS, **kw)


def test_bad_prompts_raise_clear_errors():
  cfg, params = _model()
  with pytest.raises(sample.SampleError, match='prompt 1 is empty'):
    sample.generate(params, cfg, [PROMPTS[0], np.array([], np.int32)], max_new_tokens=2)
  with pytest.raises(tokenizers.TokenizerError, match=r'ids \[17\] outside the vocabulary \(0..16\)'):
    sample.generate(params, cfg, [np.array([1, 17], np.int32)], max_new_tokens=2)
  tok = tokenizers.CharTokenizer('abcdefghijklmnopq')
  with pytest.raises(tokenizers.TokenizerError, match='not in the 17-symbol char vocabulary'):
    sample.sample_texts(params, cfg, tok, ['abz'], max_new_tokens=2)
  with pytest.raises(sample.SampleError, match='prompt 0 is empty'):
    sample.sample_texts(params, cfg, tok, [''], max_new_tokens=2)


def test_sample_texts_decodes_and_cuts_at_stop_strings():
  cfg, params = _model()
  tok = tokenizers.CharTokenizer('abcdefghijklmnopq')
  full = sample.sample_texts(params, cfg, tok, ['dbebf', 'jc'], max_new_tokens=8, temperature=0)
  assert full == [tok.decode(_uncached_greedy(cfg, params, tok.encode(p), 8)) for p in ['dbebf', 'jc']]
  stop = full[0][3:5]
  cut = sample.sample_texts(params, cfg, tok, ['dbebf', 'jc'], max_new_tokens=8, temperature=0, stop=[stop])
  assert cut[0] == full[0][: full[0].find(stop)] and stop not in cut[0]


def test_a_prompt_file_of_blank_lines_and_an_output_that_cannot_fit_are_one_line_errors(trained, tmp_path, capsys):
  from lmjax import cli  # pylint: disable=import-outside-toplevel

  blank = tmp_path / 'prompts.txt'
  blank.write_text('\n  \n\n')
  for flags, fragment in (
    ([f'--prompt_file={blank}'], 'holds no prompt (only blank lines)'),
    ([f'--prompt_file={tmp_path / "missing.txt"}'], 'No such file'),
    (['--max_new_tokens=10000000000'], 'for the output alone'),
  ):
    assert cli.main(['sample', f'--workdir={trained}', '--config.mesh.data=1', *flags]) == 2
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith('lmjax sample: error: ')]
    assert fragment in line, line


_SAMPLER_CACHE_PROBE = """
import sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from lmjax import compiling, config, model, sample
cache_dir, d_model, top_k, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if source == 'edited':  # as if a file of lmjax had changed: its fingerprint is part of every key
  real = compiling._code_fingerprint
  compiling._code_fingerprint = lambda: real() + 'edited'
cfg = config.ModelConfig(vocab_size=11, max_len=16, n_layers=1, n_heads=2, d_model=d_model).validate()
params = nn.meta.unbox(compiling.run_once(jax.jit(model.Transformer(cfg).init), jax.random.key(0),
                                          jnp.zeros((1, 16), jnp.int32))['params'])
cache = compiling.ExecutableCache(cache_dir, {})
out = sample.generate(params, cfg, [np.array([1, 2, 3])], max_new_tokens=5, top_k=top_k, seed=0, executables=cache)
print('ORIGIN', cache.origin['sample'], 'TOKENS', out[0])
"""


def test_the_sampler_cache_serves_a_repeated_call_and_never_a_changed_program(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  def run(d_model, top_k, source='as is'):
    argv = [str(tmp_path), str(d_model), str(top_k), source]
    proc = subprocess.run(
      [sys.executable, '-c', _SAMPLER_CACHE_PROBE, *argv],
      capture_output=True,
      text=True,
      timeout=180,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith('ORIGIN'))
    origin, tokens = line[len('ORIGIN ') :].split(' TOKENS ')
    return origin, tokens

  first, tokens = run(16, 0)
  assert first == 'compiled'
  assert run(16, 0) == ('lmjax cache', tokens)  # a repeated identical call: served, same samples
  assert run(32, 0)[0] == 'compiled'  # another model
  assert run(16, 3)[0] == 'compiled'  # a decoding option that changes the program (top-k)
  # lmjax's source changed: traced again, and the unchanged program it traces to is served, with the same samples
  assert run(16, 0, source='edited') == ('lmjax cache, traced', tokens)
  entries = sorted((tmp_path / 'lmjax_executables').iterdir())
  assert sorted(e.suffix for e in entries) == ['.key'] * 4 + ['.pkl'] * 3  # three programs, four inputs keys
  for entry in entries:  # a truncated entry (a kill mid-write) costs only a recompile
    entry.write_bytes(entry.read_bytes()[:50])
  assert run(16, 0) == ('compiled', tokens)
