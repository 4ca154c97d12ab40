"""XLab's data stages: download, split, tokenizer training, encode, validate, merge, stats.

``pipelines`` imports only the ground floor of ``xlab``, its tokenizer and its shard store; of ``xlab``
only ``xlab.commands`` imports ``pipelines`` (tests/test_layout.py).
"""
