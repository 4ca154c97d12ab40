"""The context window every search shares, and the small checks and helpers around a model.

Context window. A model sees at most ``max_len`` tokens (``model.cfg.max_len``, or the ``max_len``
argument; None means unlimited). A prompt longer than ``max_len`` is cut to its last ``max_len``
tokens. When the visible context holds ``max_len`` tokens and one more must be fed, it slides: the
visible context becomes the last ``max(1, max_len // 2)`` tokens of the sequence (the new token
included), re-encoded from position 0, and generation continues from there. Keeping half the window
makes the re-encoding cost amortise to O(1) per token with the cache (one re-encode of max_len/2
tokens every max_len/2 steps), at the price of a context that varies between max_len/2 and max_len
tokens instead of always being max_len.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

Model = Callable[..., torch.Tensor]  # ids (B, T) int64 -> logits (B, T, V)


def check_prompt(prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """Raise ``ValueError`` for an empty prompt or a negative ``max_new_tokens``."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt has no tokens; prepend <sos> to generate from nothing")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter; CPU for parameter-free callables."""
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def model_max_len(model: Model, max_len: Optional[int]) -> Optional[int]:
    """``max_len``, or the model's ``cfg.max_len`` when None (None: unlimited); ``ValueError`` below 1."""
    if max_len is None:
        max_len = getattr(getattr(model, "cfg", None), "max_len", None)
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return max_len


class Context:
    """The sequences being generated and what the model has seen of them.

    ``seq`` is ``(B, T)`` int64, every row the same length; the model sees ``seq[:, start:]``
    (at most ``max_len`` tokens; see the module docstring for how it slides). With a KV cache the
    visible tokens are cached and each step feeds one token.
    """

    def __init__(self, model: Model, max_len: Optional[int]):
        self.model = model
        self.max_len = max_len
        self.keep = None if max_len is None else max(1, max_len // 2)
        self.cached = hasattr(model, "new_cache")
        # Models with forward == head(hidden) (the XLab Transformer) skip the (B, T, V) logits of a
        # prefill, of which only the last position is needed.
        self.split_head = hasattr(model, "hidden") and hasattr(model, "head")
        self.seq: torch.Tensor | None = None
        self.start = 0
        self.cache: Any = None

    def _last_logits(self, ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
        kw = {} if cache is None else {"cache": cache}
        if self.split_head:  # project only the last position onto the vocabulary
            return self.model.head(self.model.hidden(ids, **kw)[:, -1]).float()  # (B, V)
        return self.model(ids, **kw)[:, -1].float()

    def _encode_visible(self) -> torch.Tensor:
        visible = self.seq[:, self.start :]
        if self.cached:
            self.cache = self.model.new_cache(visible.shape[0], device=visible.device)
            return self._last_logits(visible, self.cache)
        return self._last_logits(visible)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Encode prompts ``(B, T)``; return the next-token logits ``(B, V)`` float32."""
        self.seq = ids
        T = ids.shape[1]
        self.start = 0 if self.max_len is None or T <= self.max_len else T - self.max_len
        return self._encode_visible()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``(B,)``; return the next-token logits ``(B, V)`` float32."""
        self.seq = torch.cat([self.seq, tokens.view(-1, 1).to(self.seq.device)], dim=1)
        T = self.seq.shape[1]
        if self.max_len is not None and T - self.start > self.max_len:
            self.start = T - self.keep  # slide: re-encode the last `keep` tokens from position 0
            return self._encode_visible()
        if self.cached:
            return self._last_logits(self.seq[:, -1:], self.cache)
        return self._last_logits(self.seq[:, self.start :])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` ``(B_new,)`` int64 of the batch, in that order (repeats allowed)."""
        index = index.to(self.seq.device)
        self.seq = self.seq.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def as_batch(prompt_ids: Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """``prompt_ids`` repeated as ``n`` rows: ``(n, T)`` int64 on ``device``."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).view(1, -1)
    return ids.expand(n, -1).contiguous().to(device)
