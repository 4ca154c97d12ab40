"""Beam search's hypotheses and their length normalisation, computed in log space.

A hypothesis's score is ``logprob / n ** alpha``: ``logprob <= 0`` its summed natural-log
probability, ``n >= 1`` its new tokens, ``alpha`` the length penalty (``generate.length_penalty``,
whose range :class:`~xlab.config.GenerateConfig` declares: ``|alpha| <= 1e9``). Computed directly,
``n ** alpha`` overflows a float for ``alpha = 1000`` and ``n >= 3`` (OverflowError) and underflows
to 0 for ``alpha = -1000`` (ZeroDivisionError).

So a search ranks by :func:`rank_key`, the log of the score's magnitude,
``log(-logprob) - alpha * log(n)``: the score is ``-exp(key)``, strictly decreasing in the key, so
a lower key is a better score, and a ``logprob`` of 0 (key ``-inf``, score 0) is the best there is.
The key is finite for every finite ``logprob < 0`` and ``|alpha| <= 1e9`` (its size is at most
``1e9 * log(n)`` plus ``log(-logprob)``), so the ranking is the formula's over the whole range; the
score itself (:func:`score_of`) is reported as a float and saturates to ``-inf`` or ``-0.0`` where
the exact value is beyond a float's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_EXP = math.log(1.7976931348623157e308)  # exp() of a larger key overflows a float


def rank_key(logprob: float, n: int, alpha: float) -> float:
    """``log(-logprob / n ** alpha)``, the ranking key of a score (lower is better; ``-inf`` for a
    ``logprob`` of 0 or above, which log-probabilities never exceed).

    Args:
        logprob: summed natural-log probability, finite.
        n: number of new tokens, >= 1.
        alpha: the length penalty, finite.
    """
    if logprob >= 0.0:
        return -math.inf
    return math.log(-logprob) - alpha * math.log(n)


def score_of(key: float) -> float:
    """The score ``logprob / n ** alpha`` of a :func:`rank_key`: ``-exp(key)``, ``-inf`` where that
    overflows a float, 0.0 for a key of ``-inf``."""
    if key == -math.inf:
        return 0.0
    return -math.inf if key > MAX_EXP else -math.exp(key)


@dataclass
class Hypothesis:
    """One finished beam-search hypothesis.

    tokens: the new ids, without ``<eos>``; logprob: their summed natural-log probability (the
    ``<eos>`` step included when ``ended``); score: ``logprob / num_tokens ** length_penalty`` with
    ``num_tokens = len(tokens) + ended`` (``-inf`` or ``-0.0`` where it is beyond a float's range);
    ended: True when it chose ``<eos>``, False when it was cut at ``max_new_tokens``; key: the log of
    the score's magnitude, which ranks hypotheses exactly where the score saturates (lower is
    better; :func:`rank_key`).
    """

    tokens: list
    logprob: float
    score: float
    ended: bool
    key: float = -math.inf

    @classmethod
    def scored(cls, tokens: list, logprob: float, n: int, length_penalty: float, ended: bool) -> Hypothesis:
        """A finished hypothesis of ``n`` new tokens, its score and key computed in log space."""
        key = rank_key(logprob, n, length_penalty)
        return cls(tokens, logprob, score_of(key), ended, key)
