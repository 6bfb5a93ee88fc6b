"""lmjax: train and sample decoder-only Transformer LMs in JAX/Flax from one config file per experiment.

Start at lmjax/cli.py (the entry point) or lmjax/train.py (the loop); README.md maps the modules."""
