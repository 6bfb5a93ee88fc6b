"""Scores of generated text: exact match, BLEU and ROUGE-L against references, and the diversity of free samples.

Pure Python, no JAX. Each number is on the scale its library reports, so it can be checked against that library:
exact match and ROUGE-L in [0, 1], BLEU and self-BLEU in [0, 100] (sacrebleu's scale), distinct-n in [0, 1].
"""

from __future__ import annotations

import collections
from typing import Sequence


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the prediction equals one of the references, leading and trailing whitespace aside (a continuation
  usually starts with a space the reference does not have), else 0.0."""
  return float(any(prediction.strip() == r.strip() for r in references))


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """`sacrebleu.corpus_bleu` with its defaults (13a tokenization, exponential smoothing), with any number of
  references per prediction: the reference streams are padded with None, which sacrebleu skips."""
  import sacrebleu  # pylint: disable=import-outside-toplevel

  width = max(len(r) for r in references)
  streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
  return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(prediction: str, references: Sequence[str], scorer=None) -> float:
  """ROUGE-L F-measure (rouge-score, with its Porter stemmer off) of the prediction against its best reference."""
  scorer = scorer or rouge_scorer()
  return float(max(scorer.score(r, prediction)['rougeL'].fmeasure for r in references))


def rouge_scorer():
  from rouge_score import rouge_scorer as rs  # pylint: disable=import-outside-toplevel

  return rs.RougeScorer(['rougeL'], use_stemmer=False)


def distinct_n(samples: Sequence[str], n: int) -> float:
  """Distinct n-grams over all n-grams of the samples together (Li et al., 2016), on whitespace-separated words:
  1.0 when no n-gram repeats, near 0 when the samples say the same thing over and over. 0.0 with no n-gram."""
  grams = collections.Counter()
  for s in samples:
    words = s.split()
    grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
  total = sum(grams.values())
  return len(grams) / total if total else 0.0


def self_bleu(samples: Sequence[str]) -> float:
  """Mean sentence BLEU of each sample against all the others as references (Zhu et al., 2018, Texygen): high when
  the samples resemble each other. sacrebleu's sentence BLEU (exponential smoothing); needs two samples or more."""
  import sacrebleu  # pylint: disable=import-outside-toplevel

  if len(samples) < 2:
    raise ValueError('self-BLEU needs at least two samples')
  scores = [
    sacrebleu.sentence_bleu(s, [o for j, o in enumerate(samples) if j != i]).score for i, s in enumerate(samples)
  ]
  return sum(scores) / len(scores)
