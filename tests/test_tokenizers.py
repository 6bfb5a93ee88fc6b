"""Tests for lmjax.tokenizers: round trips, SentencePiece training/caching/recording, clear errors."""

import json

import numpy as np
import pytest

from lmjax import config as config_lib, data, tokenizers, workdir

TEXT = (
  'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n' * 40
  + 'You are all resolved rather to die than to famish?\n' * 40
)


def _dc(**kw):
  dc = config_lib.default_config().data
  dc.tokenizer, dc.spm_vocab_size = 'spm', 300
  for k, v in kw.items():
    dc[k] = v
  return dc


@pytest.fixture(scope='module')
def spm_tok():
  return tokenizers.build(_dc(), lambda: [TEXT])


@pytest.mark.parametrize('text', ['', 'Speak, speak.\n\n', '  leading and  double spaces ', 'Ünïcödé ☃ 世界 🙂\t\r\n'])
def test_spm_round_trips_any_text_including_unseen_characters(spm_tok, text):
  assert spm_tok.decode(spm_tok.encode(text)) == text


def test_spm_special_ids_and_vocab(spm_tok):
  assert (spm_tok.pad_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 2, 3) and spm_tok.vocab_size == 300
  assert spm_tok.encode('\n\n').tolist() == [4, 4]  # newline is one piece, right after the specials
  assert spm_tok.decode([2, *spm_tok.encode('hi'), 3, 0]) == 'hi'  # specials decode to nothing


@pytest.mark.parametrize('tok', [tokenizers.ByteTokenizer(), tokenizers.CharTokenizer.train([TEXT + '☃'])])
def test_char_and_byte_round_trip(tok):
  assert tok.decode(tok.encode('Speak ☃\n')) == 'Speak ☃\n'


def test_char_rejects_unseen_characters():
  with pytest.raises(tokenizers.TokenizerError, match='not in the'):
    tokenizers.CharTokenizer.train(['abc']).encode('abz')


def test_spm_vocab_larger_than_text_supports_is_actionable():
  with pytest.raises(tokenizers.TokenizerError, match=r'Lower --config.data.spm_vocab_size to <= \d+') as e:
    tokenizers.build(_dc(spm_vocab_size=5000), lambda: ['tiny text only\n'])
  assert 'INTERNAL' not in str(e.value)
  with pytest.raises(tokenizers.TokenizerError, match=r'raise --config.data.spm_vocab_size to >= \d+'):
    tokenizers.build(_dc(spm_vocab_size=260), lambda: [TEXT])


def test_spm_is_cached_and_reloaded_from_the_workdir(tmp_path, monkeypatch):
  tok = tokenizers.build(_dc(), lambda: [TEXT], str(tmp_path))
  monkeypatch.setattr(tokenizers, 'train_spm', lambda *a: pytest.fail('retrained a cached model'))
  assert tokenizers.build(_dc(), lambda: [TEXT], str(tmp_path)).sha256 == tok.sha256
  run = tmp_path / 'run'
  run.mkdir()
  tokenizers.save(tok, str(run))
  spec = json.loads((run / 'tokenizer.json').read_text())
  assert spec['sha256'] == tok.sha256 and (run / spec['model_file']).exists()
  again = tokenizers.load(str(run))  # what a sampling process does
  assert again.spec() == tok.spec() and again.encode(TEXT).tolist() == tok.encode(TEXT).tolist()


def test_existing_model_file_is_used(tmp_path, spm_tok):
  (tmp_path / 'm.model').write_bytes(spm_tok.proto)
  tok = tokenizers.build(_dc(spm_model=str(tmp_path / 'm.model')), lambda: pytest.fail('trained'))
  assert tok.sha256 == spm_tok.sha256
  with pytest.raises(tokenizers.TokenizerError, match='does not exist'):
    tokenizers.build(_dc(spm_model=str(tmp_path / 'none.model')), lambda: [TEXT])


def test_tampered_model_file_is_an_error(tmp_path, spm_tok):
  tokenizers.save(spm_tok, str(tmp_path))
  other = tokenizers.build(_dc(spm_vocab_size=296), lambda: [TEXT])
  (tmp_path / 'tokenizer.model').write_bytes(other.proto)
  with pytest.raises(tokenizers.TokenizerError, match='sha256'):
    tokenizers.load(str(tmp_path))


def test_checkpoint_with_a_different_tokenizer_is_an_error(spm_tok):
  config = config_lib.default_config()
  recorded = {'config': config.to_dict(), 'tokenizer': tokenizers.ByteTokenizer().spec()}
  with pytest.raises(tokenizers.TokenizerError, match='differs from the one recorded'):
    workdir.check_compatible(recorded, config, spm_tok.spec(), '/ckpt')


def test_workdir_tokenizer_that_differs_from_the_config_is_an_error(shakespeare_dirs, spm_tok):
  manual, data_dir = shakespeare_dirs
  c = config_lib.default_config()
  c.data.manual_dir, c.data.data_dir, c.data.tokenizer, c.data.spm_vocab_size = manual, data_dir, 'spm', 512
  with pytest.raises(tokenizers.TokenizerError, match='bpe with 300 pieces but the config asks for bpe with 512'):
    data.make_data(c, spm_tok)
  c.data.tokenizer = 'byte'
  with pytest.raises(tokenizers.TokenizerError, match="is 'spm' but the config asks for 'byte'"):
    data.make_data(c, spm_tok)


def test_spm_packed_documents_get_bos_and_eos(spm_tok):
  d = data.DocumentEncoder(spm_tok)('Speak, speak.')
  assert d['inputs'][0] == spm_tok.bos_id and d['targets'][-1] == spm_tok.eos_id
  np.testing.assert_array_equal(d['inputs'][1:], d['targets'][:-1])


def test_on_several_hosts_only_process_0_trains_spm_and_the_others_read_its_model(tmp_path):
  import threading  # pylint: disable=import-outside-toplevel

  got = {}

  def other_host():  # process 1 of 2, started first: it must wait, never train
    got['tok'] = tokenizers.build(
      _dc(), lambda: pytest.fail('process 1 trained'), str(tmp_path), process_index=1, process_count=2
    )

  waiter = threading.Thread(target=other_host)
  waiter.start()
  first = tokenizers.build(_dc(), lambda: [TEXT], str(tmp_path), process_index=0, process_count=2)
  waiter.join(timeout=60)
  assert not waiter.is_alive() and got['tok'].sha256 == first.sha256
  assert [p.name for p in tmp_path.iterdir() if '.tmp' in p.name] == []  # no writer's temporary file left


def test_waiting_for_a_model_process_0_never_writes_is_a_clear_error(tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel

  with pytest.raises(tokenizers.TokenizerError, match="check process 0's log"):
    tokenizers._wait_for(epath.Path(tmp_path) / 'never.model', timeout_s=0.2, poll_s=0.05)
