"""Evaluation beyond the eval split's loss: multiple choice, perplexity of named sets, generation against
references and the diversity of samples, on the command line (`lmjax eval --task=...`) and in the training loop
(`train.eval_tasks`).

  spec.py           one task as a string: KIND[:DATA][,KEY=VALUE]... (the syntax, for both)
  formats.py        the local files tasks read: lmjax's JSONL and the HellaSwag, ARC, PIQA, LAMBADA layouts
  loglikelihood.py  continuations scored as lm-evaluation-harness scores them, batched and jitted on the mesh
  textmetrics.py    exact match, BLEU, ROUGE-L, distinct-n, self-BLEU
  tasks.py          the four kinds of task, and `lmjax eval --task`
"""
