"""Evaluation tasks: continuations scored as lm-evaluation-harness scores them (its tokenization, window and
choice rules), the benchmark layouts read onto one format, named perplexity sets, generation and diversity scores
with known values, `lmjax eval --task`, and tasks in the training loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE, SHARED_DATA, load_tiny_hf, rows, train_tiny

from lmjax import cli, inference, tokenizers
from lmjax.errors import ConfigError, DataError
from lmjax.evals import formats, loglikelihood, spec, tasks, textmetrics

TEXT = (SHARED_DATA / 'input.txt').read_text()[:20000] if (SHARED_DATA / 'input.txt').exists() else ''


def write_jsonl(path, objs):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objs))
  return str(path)


def plain_forward(model, params, L):
  """log-softmax of the model on one row right-padded to L (which a causal model does not see), jitted once."""
  fn = jax.jit(lambda tokens_1xL: jax.nn.log_softmax(model.apply({'params': params}, tokens_1xL)[0], axis=-1))
  return lambda seq: np.asarray(fn(jnp.array([list(seq) + [0] * (L - len(seq))])))


def plain_loglikelihoods(forward, requests):
  """The harness's computation, one request at a time: the model on (context + continuation)[:-1], the
  log-softmax of each continuation token summed, and whether each was the argmax."""
  out = []
  for context, continuation in requests:
    seq = list(context) + list(continuation)
    logp_LxV = forward(seq[:-1])
    at = np.arange(len(seq) - 1)[-len(continuation) :]
    targets = np.array(seq[1:])[at]
    out.append((float(logp_LxV[at, targets].sum()), bool((np.argmax(logp_LxV[at], axis=-1) == targets).all())))
  return out


def char_requests(tokenizer, max_len, n_items=12, seed=0):
  """Items of 1-4 choices with contexts of 0-70 characters (some longer than the 32-token context, so the window
  truncates) and continuations of 1-20: several buckets, shared contexts, empty contexts."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_items):
    a, n = int(rng.integers(0, 19000)), int(rng.integers(0, 70))
    for _ in range(int(rng.integers(1, 5))):
      b, m = int(rng.integers(0, 19000)), int(rng.integers(1, 20))
      ctx, cont = loglikelihood.encode_pair(tokenizer, TEXT[a : a + n], ' ' + TEXT[b : b + m])
      out.append(loglikelihood.window(ctx, cont, max_len))
  return out


def test_loglikelihoods_equal_the_harness_computation_on_one_device_and_on_eight(trained):
  _, tokenizer, engine, state = inference.load_run(trained, ONE_DEVICE)
  L = engine.model_cfg.max_len
  requests = char_requests(tokenizer, L)
  assert any(len(c) + len(k) > L + 1 for c, k in char_requests(tokenizer, 10**6))  # the window truncates some
  forward = plain_forward(engine.model, state.params, L)
  for k in range(4):  # and continuations that greedy decoding writes, whole or their first token
    seq = tokenizer.encode(TEXT[300 * k : 300 * k + 12]).tolist()
    for _ in range(3):
      seq.append(int(np.argmax(forward(seq)[len(seq) - 1])))
    requests += [(tuple(seq[:12]), tuple(seq[12:])), (tuple(seq[:12]), tuple(seq[12:13]))]
  scorer = loglikelihood.Scorer(engine, tokens_per_call=1024)  # small calls: several, of two buckets or more
  ll, greedy = scorer(state.params, requests)
  expected = plain_loglikelihoods(forward, requests)
  np.testing.assert_allclose(ll, [e[0] for e in expected], atol=1e-4, rtol=0)
  assert list(greedy) == [e[1] for e in expected] and all(greedy[-8:])
  assert 2 <= len(scorer.shapes) <= 4  # compiled shapes: a few buckets, not one per length

  _, _, task8, state8 = inference.load_run(trained, ['mesh.data=-1'])
  assert task8.mesh.size == 8
  ll8, greedy8 = loglikelihood.Scorer(task8)(state8.params, requests[:16])
  np.testing.assert_allclose(ll8, ll[:16], atol=1e-4, rtol=0)
  assert list(greedy8) == list(greedy[:16])


class _Toy:
  """A tokenizer whose ids are visible in a test: one id per character, BOS and EOS optional."""

  def __init__(self, bos=None, eos=None, adds_bos=False):
    self.bos_id, self.eos_id, self.adds_bos = bos, eos, adds_bos

  def encode(self, text):
    return np.array([ord(c) for c in text], np.int32)


class _Merging(_Toy):
  """Merges ' a' into one token, so a context's last space changes the continuation's tokens."""

  def encode(self, text):
    out, i = [], 0
    while i < len(text):
      if text[i : i + 2] == ' a':
        out.append(1000)
        i += 2
      else:
        out.append(ord(text[i]))
        i += 1
    return np.array(out, np.int32)


def test_the_pair_tokenization_follows_the_harness():
  sp, a = ord(' '), ord('a')
  # A trailing space of the query moves to the continuation, so ' a' merges as it would in running text.
  assert loglikelihood.encode_pair(_Merging(), 'x ', 'a') == ([ord('x')], [1000])
  assert loglikelihood.encode_pair(_Merging(), 'x', ' a') == ([ord('x')], [1000])
  # The continuation is what encode(context + continuation) holds after encode(context)'s length.
  assert loglikelihood.encode_pair(_Toy(), 'xy', ' ab') == ([ord('x'), ord('y')], [sp, a, ord('b')])
  # An empty context becomes BOS (else EOS), unless the continuation starts with it; with neither, the
  # continuation's first token is the context.
  assert loglikelihood.encode_pair(_Toy(bos=7, eos=8), '', ' a') == ([7], [sp, a])
  assert loglikelihood.encode_pair(_Toy(eos=8), '', ' a') == ([8], [sp, a])
  assert loglikelihood.encode_pair(_Toy(bos=sp), '', ' a') == ([sp], [a])
  assert loglikelihood.encode_pair(_Toy(), '', ' a') == ([sp], [a])
  # A tokenizer that starts sequences with BOS (Llama's), or bos=True, starts every context with it.
  assert loglikelihood.encode_pair(_Toy(bos=7, adds_bos=True), 'x', ' a') == ([7, ord('x')], [sp, a])
  assert loglikelihood.encode_pair(_Toy(bos=7), 'x', ' a', bos=True) == ([7, ord('x')], [sp, a])
  # The window: max_len + 1 tokens, the oldest context tokens dropped first.
  assert loglikelihood.window([1, 2, 3, 4], [5, 6], max_len=4) == ((2, 3, 4), (5, 6))
  with pytest.raises(DataError, match='does not fit the model context of 4'):
    loglikelihood.window([1], [2, 3, 4, 5, 6], max_len=4, where='f.jsonl:3')
  with pytest.raises(DataError, match='f.jsonl:3.*no token to score'):
    loglikelihood.window([1], [], max_len=4, where='f.jsonl:3')


def test_acc_and_acc_norm_pick_as_the_harness_does():
  items = [
    formats.ChoiceItem('q', ('a', 'bbbb'), 1, 'f:1'),  # per character the long choice wins, in sum the short one
    formats.ChoiceItem('q', ('x', 'y', 'z'), 2, 'f:2'),  # a tie goes to the first choice
  ]
  ll = np.array([-2.0, -4.0, -1.0, -1.0, -3.0])
  results = loglikelihood.choice_results(items, ll, np.zeros(5, bool))
  assert [(r['pred'], r['pred_norm']) for r in results] == [(0, 1), (0, 0)]
  metrics = loglikelihood.choice_metrics(items, results)
  assert (metrics['acc'], metrics['acc_norm'], metrics['n']) == (0.0, 0.5, 2)
  # One continuation per item (LAMBADA): accuracy is greedy decoding; perplexity is exp(-mean log-likelihood).
  single = [formats.ChoiceItem('q', ('w',), 0, 'f:1'), formats.ChoiceItem('q', ('v',), 0, 'f:2')]
  got = loglikelihood.choice_metrics(single, loglikelihood.choice_results(single, ll[:2], np.array([True, False])))
  assert got['acc'] == 0.5 and got['ppl'] == pytest.approx(np.exp(3.0)) and 'acc_norm' not in got
  with pytest.raises(DataError, match='f:1 has one choice but other items have several'):
    loglikelihood.choice_metrics(single + items, [{}] * 4)


def test_the_benchmark_layouts_map_onto_query_choices_gold(tmp_path):
  hellaswag = {
    'activity_label': 'Baking',
    'ctx_a': 'A man is in a kitchen.',
    'ctx_b': 'he [header] picks up',
    'endings': ['a bowl [title] Mix it.', 'the  dog.'],
    'label': '1',
  }
  arc_hf = {'question': 'Which is a gas?', 'choices': {'text': ['ice', 'steam'], 'label': ['A', 'B']}, 'answerKey': 'B'}
  arc_ai2 = {
    'question': {'stem': 'Which?', 'choices': [{'text': 'x', 'label': '1'}, {'text': 'y', 'label': '2'}]},
    'answerKey': '1',
  }
  piqa = {'goal': 'Open a jar', 'sol1': 'twist', 'sol2': 'pull'}
  lambada = {'text': 'he opened the door'}
  got = [
    formats.read_choices(write_jsonl(tmp_path / f'{k}.jsonl', [o]))[0]
    for k, o in enumerate([hellaswag, arc_hf, arc_ai2])
  ]
  assert (got[0].query, got[0].choices, got[0].gold) == (
    'Baking: A man is in a kitchen. He picks up',
    ('a bowl. Mix it.', 'the dog.'),
    1,
  )
  assert (got[1].query, got[1].choices, got[1].gold) == ('Question: Which is a gas?\nAnswer:', ('ice', 'steam'), 1)
  assert (got[2].query, got[2].choices, got[2].gold) == ('Question: Which?\nAnswer:', ('x', 'y'), 0)
  (tmp_path / 'labels.lst').write_text('1\n')
  [p] = formats.read_choices(write_jsonl(tmp_path / 'piqa.jsonl', [piqa]), labels=str(tmp_path / 'labels.lst'))
  assert (p.query, p.choices, p.gold) == ('Question: Open a jar\nAnswer:', ('twist', 'pull'), 1)
  [w] = formats.read_choices(write_jsonl(tmp_path / 'lambada.jsonl', [lambada]))
  assert (w.query, w.choices, w.gold) == ('he opened the', ('door',), 0)


@pytest.mark.parametrize(
  'case',
  ['missing', 'json', 'gold', 'layout', 'spec'],
)
def test_bad_input_is_one_line_naming_file_and_line_with_exit_2(case, trained, tmp_path, capsys):
  path = tmp_path / 'items.jsonl'
  good = {'query': 'A', 'choices': ['b', 'c'], 'gold': 0}
  if case == 'json':
    path.write_text(json.dumps(good) + '\n{"query": "A", "choices": [\n')
  elif case == 'gold':
    write_jsonl(path, [good, {**good, 'gold': 2}])
  elif case == 'layout':
    write_jsonl(path, [{'prompt': 'x'}])
  task = {'spec': f'mc:{path},limt=3'}.get(case, 'mc')
  argv = ['eval', f'--workdir={trained}', f'--task={task}', *(['--data', str(path)] if task == 'mc' else [])]
  assert cli.main(argv + [f'--config.{o}' for o in ONE_DEVICE]) == 2
  [line] = capsys.readouterr().err.strip().splitlines()
  expected = {
    'missing': f'{path} does not exist',
    'json': f'{path}:2: not valid JSON',
    'gold': f'{path}:2: gold 2 is out of range for 2 choices; use an index from 0 to 1',
    'layout': f"{path}:1: keys ['prompt'] match no known layout",
    'spec': "'limt=3' is not KEY=VALUE with a key of mc tasks",
  }[case]
  assert line.startswith('lmjax eval: error: ') and expected in line, line


def test_lmjax_eval_prints_one_json_object_per_task_and_logs_each_item(trained, tmp_path, capsys):
  items = [
    {'query': TEXT[i : i + 30], 'choices': [TEXT[i + 31 : i + 40], 'zq xj'], 'gold': 0} for i in range(0, 600, 100)
  ]
  mc, log = write_jsonl(tmp_path / 'shakespeare.jsonl', items), tmp_path / 'items.jsonl'
  argv = ['eval', f'--workdir={trained}', '--task=mc', f'--data={mc}', '--task=ppl:validation+test,name=val']
  assert cli.main(argv + [f'--log_samples={log}'] + [f'--config.{o}' for o in ONE_DEVICE]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(p['task'], p['kind'], p['step']) for p in printed] == [('shakespeare', 'mc', 60), ('val', 'ppl', 60)]
  assert {'acc', 'acc_norm', 'n'} <= set(printed[0]) and printed[0]['n'] == 6
  assert printed[0]['acc_norm'] > 0.5  # trained text beats random letters
  logged = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r['index'] for r in logged] == list(range(6)) and all(len(r['ll']) == 2 for r in logged)
  assert np.mean([r['acc'] for r in logged]) == printed[0]['acc']
  # The named set of the run's own eval split reproduces `lmjax eval`'s val loss.
  plain = inference.evaluate_run(trained, ONE_DEVICE)
  assert printed[1]['loss'] == pytest.approx(plain['val_loss'], rel=1e-6)
  assert printed[1]['bpb'] == pytest.approx(plain['val_bpb'], rel=1e-6)


def test_generation_is_scored_against_its_references_and_diversity_over_samples(trained, tmp_path):
  config, tokenizer, engine, state = inference.load_run(trained, ONE_DEVICE)
  prompts = ['ROMEO:', 'KING:', 'First']
  from lmjax import sample

  greedy = sample.sample_texts(
    state.params, engine.model_cfg, tokenizer, prompts, max_new_tokens=6, temperature=0.0, mesh=engine.mesh
  )
  items = [{'prompt': p, 'reference': [g, 'nothing'] if k else g} for k, (p, g) in enumerate(zip(prompts, greedy))]
  items[2]['reference'] = 'something else'
  gen = spec.parse(f'gen:{write_jsonl(tmp_path / "g.jsonl", items)},max_new_tokens=6,stop=')
  metrics, records = tasks.build(gen, config, tokenizer, engine)(state.params)
  assert [r['prediction'] for r in records] == greedy  # greedy by default, the KV-cache sampler's
  assert [r['exact_match'] for r in records] == [1.0, 1.0, 0.0] and metrics['exact_match'] == pytest.approx(2 / 3)
  assert [r['rouge_l'] for r in records] == [textmetrics.rouge_l(r['prediction'], r['references']) for r in records]
  assert metrics['n'] == 3 and 0 <= metrics['rouge_l'] <= 1 and 0 <= metrics['bleu'] <= 100
  (tmp_path / 'p.txt').write_text('ROMEO:\nKING:\n')
  div = spec.parse(f'div:{tmp_path / "p.txt"},num_samples=3,max_new_tokens=12,temperature=1.0')
  metrics, records = tasks.build(div, config, tokenizer, engine)(state.params)
  assert [len(r['samples']) for r in records] == [3, 3] and len(set(records[0]['samples'])) == 3  # sampled, seeded
  assert set(metrics) == {'distinct_1', 'distinct_2', 'distinct_3', 'self_bleu', 'n'}


def test_text_metrics_on_fixtures_with_known_values():
  assert textmetrics.exact_match(' Paris ', ['Rome', 'Paris']) == 1.0
  assert textmetrics.exact_match('Paris.', ['Paris']) == 0.0
  # BLEU by hand: p1..p4 = 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty).
  assert textmetrics.corpus_bleu(['a b c d e f'], [['a b c d x f']]) == pytest.approx(
    100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6
  )
  # a second reference that matches makes it perfect; a varying number of references per item is allowed
  assert textmetrics.corpus_bleu(
    ['a b c d e f', 'g h i j'], [['a b c d x f', 'a b c d e f'], ['g h i j']]
  ) == pytest.approx(100.0)
  # ROUGE-L: longest common subsequence 'a c d' of 4 and 4 words: P = R = F = 3/4; the best reference counts.
  assert textmetrics.rouge_l('a b c d', ['a c d e']) == pytest.approx(0.75)
  assert textmetrics.rouge_l('a b c d', ['x y', 'a b c d']) == pytest.approx(1.0)


def test_distinct_n_and_self_bleu_on_a_hand_made_sample():
  samples = ['a b a b', 'a c']  # unigrams a b a b a c; bigrams ab ba ab ac; trigrams aba bab
  assert [textmetrics.distinct_n(samples, n) for n in (1, 2, 3)] == [3 / 6, 3 / 4, 2 / 2]
  assert textmetrics.distinct_n(['a'], 2) == 0.0
  assert textmetrics.self_bleu(['the cat sat on the mat'] * 3) == pytest.approx(100.0)
  assert textmetrics.self_bleu(['the cat sat on the mat', 'dogs run far away quickly']) < 10


def test_task_specs_and_their_errors():
  s = spec.parse('mc:data/hellaswag_val.jsonl,limit=100,every=20')
  assert (s.kind, s.data, s.name, s.options) == (
    'mc',
    'data/hellaswag_val.jsonl',
    'hellaswag_val',
    {'limit': 100, 'every': 20},
  )
  assert spec.parse('ppl:validation+test').name == 'validation+test' and not spec.is_path('validation+test')
  assert spec.parse('gen:a/b.jsonl,stop=\\n').get('stop') == '\n'
  assert [x.data for x in spec.parse_all(['mc', 'ppl:test', 'gen'], ['a.jsonl', 'b.jsonl'])] == [
    'a.jsonl',
    'test',
    'b.jsonl',
  ]
  for bad, match in [
    ('xx:a', "unknown kind 'xx'"),
    ('mc', 'names no data'),
    ('mc:a,limit=x', "limit='x' is not a int"),
    ('ppl:test,bos=true', "'bos=true' is not KEY=VALUE with a key of ppl tasks"),
  ]:
    with pytest.raises(ConfigError, match=match):
      spec.parse_all([bad])
  with pytest.raises(ConfigError, match=r"named \['a'\] more than once"):
    spec.parse_all(['mc:x/a.jsonl', 'gen:y/a.jsonl'])


def test_in_loop_tasks_write_their_metrics_at_their_interval_and_compare_reads_them(
  tmp_path, shakespeare_dirs, cache_dir
):
  items = [
    {'query': TEXT[i : i + 20], 'choices': [TEXT[i + 21 : i + 30], 'zzq'], 'gold': 0} for i in range(0, 400, 100)
  ]
  mc = write_jsonl(tmp_path / 'hs.jsonl', items)
  wd = tmp_path / 'run'
  tasks_field = f"('mc:{mc},every=20', 'ppl:validation+test,name=val,limit=1')"
  train_tiny(wd, shakespeare_dirs, f'train.eval_tasks={tasks_field}', cache=cache_dir)
  logged = rows(wd)
  assert [(r['step'], r['hs/n']) for r in logged if 'hs/acc' in r] == [(20, 4), (40, 4), (60, 4)]
  assert [r['step'] for r in logged if 'val/loss' in r] == [30, 60]  # train.eval_every
  assert (wd / 'tensorboard').is_dir()
  # `lmjax compare` (and sweep tables) show each task metric's final value and can test it
  assert cli.main(['compare', str(wd), f'--out={tmp_path / "table"}', '--metrics=hs/acc_norm,val/loss']) == 0
  [header] = [
    line for line in (tmp_path / 'table' / 'results.md').read_text().splitlines() if '| variant | seeds' in line
  ]
  assert '| final hs/acc |' in header and '| final hs/acc_norm |' in header and '| final val/loss |' in header
  with pytest.raises(ConfigError, match='train.eval_tasks'):
    train_tiny(tmp_path / 'bad', shakespeare_dirs, "train.eval_tasks=('nope:x',)")


def test_the_tokenizers_interface_is_all_the_scorer_needs():
  char = tokenizers.CharTokenizer('ab ')
  assert loglikelihood.encode_pair(char, 'ab ', 'a') == ([0, 1], [2, 0])
  byte = tokenizers.ByteTokenizer()
  assert loglikelihood.encode_pair(byte, '', 'a') == ([byte.bos_id], [ord('a')])


# The imported models the harness comparison runs on: GPT-2, and Qwen2 (RMSNorm, RoPE, SwiGLU, q/k/v biases,
# grouped-query attention), each with a 48-token context.
EVAL_SHAPES = {
  'gpt2': dict(n_positions=48, n_embd=32, n_layer=2, n_head=2),
  'qwen2': dict(
    max_position_embeddings=48,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  ),
}


@pytest.fixture(scope='module', params=list(EVAL_SHAPES))
def imported_hf(request, tmp_path_factory):
  """(HF model, HF tokenizer, lmjax workdir): a tiny model with random weights and a byte-level BPE tokenizer trained
  here (experiments/tiny_hf.py), saved as save_pretrained writes them and imported (lmjax/hf/)."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from lmjax import hf

  source = str(tmp_path_factory.mktemp('hf'))
  shape = EVAL_SHAPES[request.param]
  model, tok = load_tiny_hf().save(source, request.param, text=TEXT, vocab_size=400, std=0.1, **shape)
  workdir = str(tmp_path_factory.mktemp('imported'))
  hf.import_hf(source, workdir)
  return model, tok, workdir


def harness_loglikelihood(model, tok, context, continuation, max_length):
  """lm-evaluation-harness's loglikelihood of one request for a causal HF model, written out from its rules."""
  import torch

  if context == '':
    cont = tok.encode(continuation, add_special_tokens=False)
    ctx_enc, cont_enc = ([tok.bos_token_id], cont) if cont[0] != tok.bos_token_id else (cont[:1], cont[1:])
  else:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx_enc = tok.encode(context + continuation), tok.encode(context)
    cont_enc = whole[len(ctx_enc) :]
  inp = (ctx_enc + cont_enc)[-(max_length + 1) :][:-1]
  with torch.no_grad():
    logp_LxV = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
  logp_CxV = logp_LxV[len(inp) - len(cont_enc) :]
  targets = torch.tensor(cont_enc)
  ll = float(logp_CxV.gather(1, targets[:, None]).sum())
  return ll, bool((logp_CxV.argmax(-1) == targets).all())


def test_an_imported_model_scores_each_item_as_the_harness_scores_it_with_transformers(imported_hf, tmp_path, capsys):
  model, tok, workdir = imported_hf
  words = TEXT.split()
  rng = np.random.default_rng(1)
  items = []
  for k in range(10):
    a = int(rng.integers(0, len(words) - 60))
    query = ' '.join(words[a : a + int(rng.integers(3, 40))])  # some longer than the 48-token context
    choices = [' '.join(words[b : b + int(rng.integers(1, 8))]) for b in rng.integers(0, len(words) - 10, 3)]
    items.append({'query': query + (' ' if k % 3 == 0 else ''), 'choices': choices, 'gold': int(rng.integers(3))})
  items[1]['query'] = ''  # an empty context: the harness conditions on BOS (<|endoftext|>)
  assert any(len(tok.encode(i['query'] + ' ' + c)) > 49 for i in items for c in i['choices'])  # the window cuts
  mc, log = write_jsonl(tmp_path / 'items.jsonl', items), tmp_path / 'log.jsonl'
  assert (
    cli.main(['eval', f'--workdir={workdir}', f'--task=mc:{mc}', f'--log_samples={log}', '--config.mesh.data=1']) == 0
  )
  printed = json.loads(capsys.readouterr().out.splitlines()[-1])
  logged = [json.loads(line) for line in log.read_text().splitlines()]

  expected = [[harness_loglikelihood(model, tok, i['query'], ' ' + c, 48) for c in i['choices']] for i in items]
  np.testing.assert_allclose([r['ll'] for r in logged], [[e[0] for e in x] for x in expected], atol=1e-4, rtol=0)
  assert [r['greedy'] for r in logged] == [[e[1] for e in x] for x in expected]
  lls = [np.array([e[0] for e in x]) for x in expected]
  norm = [ll / np.array([len(c) for c in i['choices']]) for ll, i in zip(lls, items)]
  for picks in (lls, norm):  # no near-tie, so equal picks are a real agreement
    assert min(np.diff(np.sort(p))[-1] for p in picks) > 1e-3
  assert [r['pred'] for r in logged] == [int(np.argmax(x)) for x in lls]
  assert [r['pred_norm'] for r in logged] == [int(np.argmax(x)) for x in norm]
  assert printed['acc'] == np.mean([np.argmax(x) == i['gold'] for x, i in zip(lls, items)])
  assert printed['acc_norm'] == np.mean([np.argmax(x) == i['gold'] for x, i in zip(norm, items)])
