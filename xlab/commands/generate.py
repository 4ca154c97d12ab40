"""``xlab generate``: the command's option checks, checkpoint loading and printing; the searches
are :mod:`xlab.generate`."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import torch

from xlab.checkpoint import load_model_meta
from xlab.device import resolve_device
from xlab.errors import XLabError
from xlab.generate import Streamer, check_sampling, continuations, encode_prompt


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


def check_seed(seed: int, num_samples: int = 1) -> None:
    """Sample ``i`` seeds a torch generator with ``seed + i``, which must fit in 0 .. 2**63 - 1."""
    if seed < 0 or seed + max(num_samples, 1) - 1 >= 2**63:
        raise XLabError(
            f"--seed must be between 0 and {2**63 - num_samples} (each of {num_samples} sample(s) uses seed + i), "
            f"got {seed}"
        )


def check_cli_options(
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    beam_width: int = 1,
    num_samples: int = 1,
    greedy: bool = False,
) -> None:
    """Check the options of ``xlab generate`` / ``xlab predict`` once, before any work.

    Raises:
        XLabError: a value out of range or two options that exclude each other, named as on the
            command line.
    """
    if max_new_tokens < 0:
        raise XLabError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    try:
        check_sampling(temperature, top_k, top_p)
    except ValueError as e:
        raise XLabError(
            str(e).replace("temperature", "--temperature").replace("top_k", "--top-k").replace("top_p", "--top-p")
        ) from None
    if beam_width < 1:
        raise XLabError(f"--beam-width must be >= 1, got {beam_width}")
    if num_samples < 1:
        raise XLabError(f"--num-samples must be >= 1, got {num_samples}")
    if greedy and beam_width > 1:
        raise XLabError("--greedy and --beam-width > 1 are two different searches: choose one")
    if num_samples > 1 and (beam_width > 1 or greedy or temperature == 0):
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
    """``xlab generate``: print ``num_samples`` texts (prompt + continuation) on stdout.

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
    check_cli_options(max_new_tokens, temperature, top_k, top_p, beam_width, num_samples, greedy)
    if not math.isfinite(length_penalty):
        raise XLabError(f"--length-penalty must be finite, got {length_penalty}")
    check_seed(seed, num_samples)
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
