"""Searches over token ids: greedy search, sampling and beam search, and teacher-forced scoring.
The text layer (prompts, streaming, decoding) is :mod:`xlab.generate.text`.

The search functions take any ``model`` callable that maps ids ``(B, T)`` int64 to logits
``(B, T, V)``. When the model offers a KV cache (it has ``new_cache(batch_size, device=...)``, as the
XLab :class:`~xlab.model.Transformer` does), the prompt is encoded once and every step feeds only the
newest token; otherwise the whole visible context is recomputed at every step. Both paths follow the
same context rule (:mod:`xlab.generate.context`), so they produce the same tokens.

The context window (how a long prompt or generation slides) is :mod:`xlab.generate.context`.

Randomness. Sample ``i`` of a call draws its uniforms from its own CPU ``torch.Generator`` seeded
with ``seed + i`` and picks its token by inverse-CDF lookup in the (filtered) probabilities. The
draws are therefore the same on CPU and CUDA and do not depend on how many samples run together:
the same seed gives the same text wherever the model gives the same probabilities.

Filtering order (as in the common Hugging Face ``generate`` recipe): temperature, then top-k, then
top-p (nucleus sampling, Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from xlab.generate.context import Context, Model, as_batch, check_prompt, model_device, model_max_len
from xlab.generate.hypothesis import Hypothesis, rank_key


# ------------------------------------------------------------------------------------ checking
def check_sampling(temperature: float, top_k: Optional[int], top_p: float) -> None:
    """Raise ``ValueError`` for a negative or non-finite temperature, a negative ``top_k`` or a
    ``top_p`` outside (0, 1]."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------- filtering
def filter_logits(logits: torch.Tensor, *, top_k: Optional[int] = None, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of the tokens that top-k and then top-p remove to ``-inf``.

    Args:
        logits: ``(B, V)`` float logits, already divided by the temperature.
        top_k: keep the ``top_k`` largest logits (exactly k; ties broken towards the lower id);
            0 or None: off; ``top_k >= V``: nothing removed.
        top_p: keep the smallest set of most probable tokens whose probability reaches ``top_p``,
            the token that crosses ``top_p`` included (so the most probable token is always kept);
            1.0: off. Probabilities [0.5, 0.3, 0.15, 0.05] with ``top_p=0.6`` keep tokens 0 and 1.

    Returns:
        ``(B, V)`` float logits, a new tensor.

    Raises:
        ValueError: ``top_k < 0`` or ``top_p`` outside (0, 1].
    """
    check_sampling(0.0, top_k, top_p)
    return _filter(logits, top_k, top_p)


def _filter(logits: torch.Tensor, top_k: Optional[int], top_p: float) -> torch.Tensor:
    """:func:`filter_logits` without the argument checks (the decoding loop checks them once)."""
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        # Keep everything above the k-th value, then, of the ids equal to it, the lowest ones up to
        # k in all (like argmax's tie rule); O(V) where a full sort would be O(V log V).
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        above = logits > kth
        tied = logits == kth
        room = top_k - above.sum(-1, keepdim=True)  # (B, 1) tied ids that still fit
        keep = above | (tied & (torch.cumsum(tied.int(), dim=-1) <= room))
        logits.masked_fill_(~keep, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # Mass strictly before each token (exclusive cumsum): a token is kept while the tokens
        # ranked above it have not yet reached top_p, which keeps the crossing token too.
        before = torch.zeros_like(sorted_p)
        before[:, 1:] = torch.cumsum(sorted_p, dim=-1)[:, :-1]
        remove_sorted = before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
        logits.masked_fill_(remove, float("-inf"))
    return logits


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids ``(B,)`` int64 drawn from ``probs`` ``(B, V)`` with uniforms ``(B,)`` in [0, 1).

    Picks the first id whose cumulative probability exceeds ``u * total``, so a zero-probability id
    is never picked (clamped to the last positive id against rounding at u close to 1)."""
    cdf = torch.cumsum(probs, dim=-1)
    u = uniforms.to(device=probs.device, dtype=probs.dtype) * cdf[:, -1]
    idx = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    vocab = probs.shape[-1]
    last_positive = vocab - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return torch.minimum(idx, last_positive)


# ------------------------------------------------------------------------- greedy and sampling
Picker = Callable[[torch.Tensor, list], torch.Tensor]


def _decode(
    model: Model,
    prompts: torch.Tensor,
    max_new_tokens: int,
    pick: Picker,
    *,
    eos_id: Optional[int],
    max_len: Optional[int],
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[list[int]]:
    """Extend each row of ``prompts`` ``(B, T)`` token by token; ``pick(logits (b, V), rows)`` chooses
    the next ids ``(b,)`` of the still-running rows ``rows`` (indices into the batch).

    A row stops at ``eos_id`` (compared by id, never part of the result) or after ``max_new_tokens``;
    stopped rows leave the batch so the others run on unchanged. Returns the new ids of each row."""
    ctx = Context(model, model_max_len(model, max_len))
    out: list[list[int]] = [[] for _ in range(prompts.shape[0])]
    if max_new_tokens == 0:
        return out
    logits = ctx.prefill(prompts)
    rows = list(range(prompts.shape[0]))
    for step in range(max_new_tokens):
        tokens = pick(logits, rows)
        keep = []
        for j, t in enumerate(tokens.tolist()):
            if eos_id is not None and t == eos_id:
                continue
            out[rows[j]].append(t)
            if on_token is not None:
                on_token(rows[j], t)
            keep.append(j)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long)
            ctx.reorder(index)
            tokens = tokens[index.to(tokens.device)]
            rows = [rows[j] for j in keep]
        logits = ctx.step(tokens)
    return out


def _greedy_pick(logits: torch.Tensor, rows: list) -> torch.Tensor:
    return logits.argmax(-1)  # first maximum on ties


def _sample_picker(temperature: float, top_k: Optional[int], top_p: float, seeds: Sequence[int]) -> Picker:
    if temperature == 0:
        return _greedy_pick
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def pick(logits: torch.Tensor, rows: list) -> torch.Tensor:
        probs = torch.softmax(_filter(logits / temperature, top_k, top_p), dim=-1)
        u = torch.cat([torch.rand(1, generator=gens[r], dtype=torch.float64) for r in rows])
        return _inverse_cdf(probs, u)

    return pick


@torch.inference_mode()
def greedy_search(
    model: Model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: Optional[int] = None,
    max_len: Optional[int] = None,
    on_token: Optional[Callable[[int], None]] = None,
) -> list[int]:
    """Extend ``prompt_ids`` with the most probable token at every step.

    Args:
        model: callable ids ``(B, T)`` int64 -> logits ``(B, T, V)``; its KV cache is used when it has
            ``new_cache``.
        prompt_ids: the prompt's token ids (at least one; include ``<sos>`` if the model expects it).
        max_new_tokens: at most this many new tokens.
        eos_id: stop when this id is chosen (it is not returned); None: never stop early.
        max_len: the model's context size (default ``model.cfg.max_len``); see the module docstring.
        on_token: called with each new id as it is chosen (streaming).

    Returns:
        The new token ids (without ``<eos>``). Ties go to the lowest id.

    Raises:
        ValueError: an empty prompt or a negative ``max_new_tokens``.
    """
    check_prompt(prompt_ids, max_new_tokens)
    cb = None if on_token is None else (lambda row, t: on_token(t))
    return _decode(
        model,
        as_batch(prompt_ids, 1, model_device(model)),
        max_new_tokens,
        _greedy_pick,
        eos_id=eos_id,
        max_len=max_len,
        on_token=cb,
    )[0]


@torch.inference_mode()
def sample(
    model: Model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    eos_id: Optional[int] = None,
    max_len: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[list[int]]:
    """Draw ``num_samples`` continuations of ``prompt_ids``, batched in one forward pass per step.

    Args:
        model, prompt_ids, max_new_tokens, eos_id, max_len: as in :func:`greedy_search`.
        temperature: logits are divided by it; 0 means greedy.
        top_k, top_p: see :func:`filter_logits` (applied after the temperature, top-k first).
        num_samples: independent samples; sample ``i`` uses a CPU generator seeded ``seed + i``, so
            it is the same whatever ``num_samples`` is and whatever the device.
        on_token: called as ``on_token(sample_index, id)`` for each new id.

    Returns:
        ``num_samples`` lists of new token ids (each without ``<eos>``).

    Raises:
        ValueError: bad temperature/top_k/top_p, ``num_samples < 1``, empty prompt, negative
        ``max_new_tokens``.
    """
    check_sampling(temperature, top_k, top_p)
    check_prompt(prompt_ids, max_new_tokens)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    pick = _sample_picker(temperature, top_k, top_p, [seed + i for i in range(num_samples)])
    return _decode(
        model,
        as_batch(prompt_ids, num_samples, model_device(model)),
        max_new_tokens,
        pick,
        eos_id=eos_id,
        max_len=max_len,
        on_token=on_token,
    )


# ---------------------------------------------------------------------------------- beam search
@torch.inference_mode()
def beam_search(
    model: Model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    beam_width: int = 4,
    length_penalty: float = 1.0,
    eos_id: Optional[int] = None,
    max_len: Optional[int] = None,
) -> list[Hypothesis]:
    """Beam search: keep the ``beam_width`` most probable partial continuations.

    Each step runs ONE forward pass over all live beams (the KV cache is reordered to follow the
    surviving beams) and ranks every one-token extension by its summed log-probability (float64,
    ties towards the lower beam then the lower id). The best ``beam_width`` extensions are the next
    step's beams, except that an extension ending in ``<eos>`` leaves the beam as a finished
    hypothesis (so the beam narrows as hypotheses finish; with ``beam_width=1`` this is exactly
    greedy search). A hypothesis's score is its summed log-probability divided by its number of new
    tokens (``<eos>`` included) to the power ``length_penalty``: the prompt never counts. Scores are
    compared in log space (:mod:`xlab.generate.hypothesis`), so every ``length_penalty`` of the
    configured range (``|length_penalty| <= 1e9``) ranks as the formula says, without overflow.

    Stopping: when no live beam can still beat the best finished score. A live beam with summed
    log-probability ``L <= 0`` after ``n`` new tokens can only end with ``L' <= L`` after ``m`` tokens,
    ``n < m <= max_new_tokens``, so its final score is at most ``L / m* ** length_penalty`` with
    ``m* = max_new_tokens`` when ``length_penalty > 0`` (the longest ending divides the negative sum
    most) and ``m* = n + 1`` otherwise. Dividing by the current length instead, the usual shortcut,
    stops too early when ``length_penalty > 0``. Beams still live at ``max_new_tokens`` are scored as
    they are (``ended=False``).

    Args:
        model, prompt_ids, max_new_tokens, eos_id, max_len: as in :func:`greedy_search`.
        beam_width: number of beams (>= 1).
        length_penalty: exponent of the length normalisation (0: raw sum; 1: mean log-probability).

    Returns:
        The finished hypotheses, best score first (stable on ties); the first is the search result.
        With ``max_new_tokens=0``: one empty hypothesis of score 0.

    Raises:
        ValueError: ``beam_width < 1``, a non-finite ``length_penalty``, empty prompt, negative
        ``max_new_tokens``, or log-probabilities that are all NaN (damaged weights).
    """
    check_prompt(prompt_ids, max_new_tokens)
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    if max_new_tokens == 0:
        return [Hypothesis([], 0.0, 0.0, False)]
    device = model_device(model)
    ctx = Context(model, model_max_len(model, max_len))
    logits = ctx.prefill(as_batch(prompt_ids, 1, device))  # one beam until the first expansion
    beams: list[list[int]] = [[]]
    beam_lp = torch.zeros(1, dtype=torch.float64, device=device)
    finished: list[Hypothesis] = []
    for n in range(1, max_new_tokens + 1):  # n: new tokens of every candidate of this step
        logp = torch.log_softmax(logits.double(), dim=-1)  # (W, V) in float64: sums stay exact-ish
        vocab = logp.shape[-1]
        cand = (beam_lp[:, None] + logp).view(-1)  # (W * V)
        k = min(beam_width, cand.numel())
        # The k best with lowest-index tie-breaking: everything >= the k-th value, stably sorted.
        kth = torch.topk(cand, k).values[-1]
        idx = torch.nonzero(cand >= kth).view(-1)
        vals, order = torch.sort(cand[idx], descending=True, stable=True)
        idx, vals = idx[order[:k]].tolist(), vals[:k].tolist()
        if not idx:
            raise ValueError("beam search found no finite candidate: the model's log-probabilities are NaN")
        src, toks, lps = [], [], []
        for flat, lp in zip(idx, vals):
            if lp == float("-inf"):
                break
            b, t = divmod(flat, vocab)
            if eos_id is not None and t == eos_id:
                finished.append(Hypothesis.scored(list(beams[b]), lp, n, length_penalty, True))
            else:
                src.append(b), toks.append(t), lps.append(lp)
        beams = [beams[b] + [t] for b, t in zip(src, toks)]
        if n == max_new_tokens:
            finished += [Hypothesis.scored(h, lp, n, length_penalty, False) for h, lp in zip(beams, lps)]
            break
        if not beams:
            break
        if finished:
            m = max_new_tokens if length_penalty > 0 else n + 1
            if min(h.key for h in finished) <= rank_key(max(lps), m, length_penalty):  # best score >= bound
                break
        index = torch.tensor(src, dtype=torch.long, device=device)
        ctx.reorder(index)
        beam_lp = torch.tensor(lps, dtype=torch.float64, device=device)
        logits = ctx.step(torch.tensor(toks, dtype=torch.long, device=device))
    return sorted(finished, key=lambda h: h.key)


# ---------------------------------------------------------------------------- all three searches
def continuations(
    model: Model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    greedy: bool = False,
    beam_width: int = 1,
    length_penalty: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    eos_id: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[list[int]]:
    """New ids for each of ``num_samples`` continuations of ``prompt_ids``, by beam search
    (``beam_width > 1``; every sample is the one best hypothesis), greedy search (``greedy`` or
    temperature 0) or sampling; the arguments are those of :func:`sample` and :func:`beam_search`.
    ``on_token(sample_index, id)`` is not called by beam search.

    Raises:
        ValueError: as :func:`sample` and :func:`beam_search`.
    """
    check_sampling(temperature, top_k, top_p)
    if beam_width > 1:
        best = beam_search(
            model, prompt_ids, max_new_tokens, beam_width=beam_width, length_penalty=length_penalty, eos_id=eos_id
        )[0].tokens
        return [best] * num_samples
    if greedy:
        temperature = 0.0
    return sample(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        seed=seed,
        eos_id=eos_id,
        on_token=on_token,
    )


# -------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def reference_nll(
    model: Model, prefix_ids: Sequence[int], target_ids: Sequence[int], *, max_len: Optional[int] = None
) -> list[float]:
    """Teacher-forced negative log-likelihood (nats) of each of ``target_ids`` after ``prefix_ids``.

    The context follows the same window rule as generation (module docstring): when everything fits
    in ``max_len`` it is one forward pass, else token by token through :class:`_Context`.

    Returns:
        ``len(target_ids)`` floats, ``-log p(target_i | prefix, target_<i)``.
    """
    check_prompt(prefix_ids, 0)
    targets = torch.as_tensor(list(target_ids), dtype=torch.long)
    if targets.numel() == 0:
        return []
    max_len = model_max_len(model, max_len)
    device = model_device(model)
    prefix = torch.as_tensor(list(prefix_ids), dtype=torch.long)
    if max_len is None or len(prefix) + len(targets) - 1 <= max_len:
        ids = torch.cat([prefix, targets[:-1]]).view(1, -1).to(device)
        logits = model(ids)[0, len(prefix) - 1 :].float()  # (n_targets, V)
    else:
        ctx = Context(model, max_len)
        rows = [ctx.prefill(prefix.view(1, -1).to(device))]
        for t in targets[:-1].tolist():
            rows.append(ctx.step(torch.tensor([t], device=device)))
        logits = torch.cat(rows)
    nll = F.cross_entropy(logits, targets.to(logits.device), reduction="none")
    return nll.tolist()
