"""XLab's data stages: download, split, tokenizer training, encode, validate, merge, stats.

``pipelines`` imports ``xlab``; ``xlab`` never imports ``pipelines``.
"""
