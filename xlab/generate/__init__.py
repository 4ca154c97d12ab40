"""Generation: searches over ids (:mod:`~xlab.generate.search`: greedy, sampling, beam search,
teacher-forced scoring), the text layer (:mod:`~xlab.generate.text`: prompts, streaming) and
``predict`` over a store's predict split (:mod:`~xlab.generate.predict`).

``from xlab.generate import generate`` is the one-call API: a model, a tokenizer and a prompt in,
text out. Importing this package imports torch.
"""

from xlab.generate.search import (
    Hypothesis,
    Model,
    beam_search,
    check_sampling,
    continuations,
    filter_logits,
    greedy_search,
    reference_nll,
    sample,
)
from xlab.generate.text import Streamer, encode_prompt, generate

__all__ = [
    "Hypothesis",
    "Model",
    "Streamer",
    "beam_search",
    "check_sampling",
    "continuations",
    "encode_prompt",
    "filter_logits",
    "generate",
    "greedy_search",
    "reference_nll",
    "sample",
]
