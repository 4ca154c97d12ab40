"""``xlab generate``: the command's option checks, checkpoint loading and printing; the searches
are :mod:`xlab.generate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from xlab.checkpoint import load_model_meta
from xlab.device import resolve_device
from xlab.errors import XLabError
from xlab.generate import Streamer, continuations, encode_prompt


def load_for_cli(checkpoint: Path, device: torch.device):
    """(model, cfg, tokenizer, meta) of a checkpoint .pt or an export folder, the model on ``device``;
    ``meta`` holds ``shards`` (the store trained on) and ``tokenizer_sha256``."""
    if not Path(checkpoint).exists():
        raise XLabError(f"checkpoint not found: {checkpoint}; train one with `xlab train`")
    return load_model_meta(checkpoint, device=str(device))


def note_prompt_cut(n_prompt: int, model) -> None:
    """Say on stderr, once, that a prompt longer than the model's context loses its first tokens:
    the searches keep the last ``max_len`` (:mod:`xlab.generate.context`) without a word."""
    max_len = getattr(getattr(model, "cfg", None), "max_len", None)
    if max_len is not None and n_prompt > max_len:
        print(
            f"note: the prompt is {n_prompt} tokens and the model's context {max_len}: "
            f"its first {n_prompt - max_len} tokens are dropped",
            file=sys.stderr,
            flush=True,
        )


def check_options(*, greedy: bool = False, **values) -> None:
    """Check the decoding options of ``xlab generate`` / ``xlab predict`` once, before any work.

    Args:
        greedy: the ``--greedy`` flag.
        **values: settings of the ``generate:`` section by name (``temperature=0.5``, ...); the
            others take their defaults. Their ranges are :class:`~xlab.config.GenerateConfig`'s.

    Raises:
        XLabError: a value out of its range (named ``generate.KEY``, as ``-o`` spells it), or two
            options that exclude each other, named as on the command line.
    """
    import dataclasses

    from xlab.config import GenerateConfig, check_ranges

    g = dataclasses.replace(GenerateConfig(), **values)
    check_ranges(GenerateConfig, g, "generate")
    if greedy and g.beam_width > 1:
        raise XLabError("--greedy and --beam-width > 1 are two different searches: choose one")
    if g.num_samples > 1 and (g.beam_width > 1 or greedy or g.temperature == 0):
        raise XLabError("--num-samples > 1 needs sampling: drop --beam-width/--greedy or use --temperature > 0")


def cli_generate(
    checkpoint: Path,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    greedy: bool,
    beam_width: int,
    length_penalty: float,
    num_samples: int,
    seed: int,
    add_sos: bool,
    device: str,
    stream: bool,
) -> list[str]:
    """``xlab generate``: print ``num_samples`` texts (prompt + continuation) on stdout. The
    options are the ``generate:`` section's (:class:`~xlab.config.GenerateConfig`: its ranges apply).

    Samples are printed one after the other, separated by a ``--- sample i/N ---`` line when there is
    more than one. With ``stream`` the text appears as it is generated (samples then run one after
    the other; sample ``i`` still uses seed ``seed + i``, so the text is the same as without
    ``stream``); beam search prints its result when the search ends.

    Returns:
        The texts printed.

    Raises:
        XLabError: bad option values, a missing checkpoint, an unavailable device, an empty prompt
        with ``--continue``.
    """
    check_options(
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_samples=num_samples,
        beam_width=beam_width,
        length_penalty=length_penalty,
    )
    model, _cfg, tok, _meta = load_for_cli(checkpoint, resolve_device(device))
    if beam_width > tok.vocab_size:
        raise XLabError(f"--beam-width {beam_width} exceeds the vocabulary ({tok.vocab_size} ids); use fewer beams")
    prompt_ids = ([tok.sos_id] if add_sos else []) + encode_prompt(tok, prompt)
    if not prompt_ids:
        raise XLabError("empty prompt with --continue: give a prompt or drop --continue")
    text_ids = prompt_ids[1:] if add_sos else prompt_ids
    note_prompt_cut(len(prompt_ids), model)
    opts = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p,
        greedy=greedy,
        beam_width=beam_width,
        length_penalty=length_penalty,
        eos_id=tok.eos_id,
    )

    def header(i: int) -> None:
        if num_samples > 1:
            print(f"--- sample {i + 1}/{num_samples} ---", flush=True)

    texts = []
    if stream and beam_width <= 1:
        for i in range(num_samples):
            header(i)
            streamer = Streamer(tok, text_ids, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            new = continuations(model, prompt_ids, num_samples=1, seed=seed + i, on_token=streamer.push, **opts)[0]
            streamer.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            texts.append(tok.decode(text_ids + new))
    else:
        news = continuations(model, prompt_ids, num_samples=num_samples, seed=seed, **opts)
        for i, new in enumerate(news):
            header(i)
            texts.append(tok.decode(text_ids + new))
            print(texts[-1], flush=True)
    return texts
