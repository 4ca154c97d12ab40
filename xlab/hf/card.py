"""``generation_config.json`` and the model card (``README.md``) of a Hugging Face export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

WIKIPEDIA_LICENCE = (
    "The training text is Wikipedia's, by its contributors, under the Creative Commons "
    "Attribution-ShareAlike 4.0 licence (CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/); "
    "text this model reproduces from it falls under that licence."
)


def generation_config(g: Any, special: dict) -> dict:
    """transformers' ``generation_config.json`` from XLab's ``generate:`` section ``g``.

    Temperature 0 is greedy search (``do_sample`` false); top-k off is ``top_k`` 0 (transformers'
    default would be 50); the filters apply in XLab's order (temperature, top-k, top-p). Samples are
    drawn from the same distribution, not with XLab's per-sample seeds, so they are not XLab's texts.
    """
    out: dict = {**special, "max_new_tokens": int(g.max_new_tokens)}
    if float(g.temperature) > 0:
        out |= {
            "do_sample": True,
            "temperature": float(g.temperature),
            "top_k": int(g.top_k or 0),
            "top_p": float(g.top_p),
        }
    else:
        out["do_sample"] = False
    if int(g.beam_width) > 1:
        out |= {"num_beams": int(g.beam_width), "length_penalty": float(g.length_penalty), "do_sample": False}
    return out


def last_val(ckpt_path: Path, step: int) -> Optional[dict]:
    """The run's last validation record at or before ``step`` (``runs/<run>/metrics.jsonl`` beside
    ``checkpoints/``), or None when the run folder or the record is not there."""
    path = ckpt_path.resolve().parent.parent / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("split") == "val" and isinstance(r.get("step"), int) and r["step"] <= step:
            best = r
    return best


def _data_line(cfg: Any) -> str:
    d = cfg.data
    if str(d.source) == "sample":
        return ("the built-in Wikipedia sample: the English Vital Article summaries and the articles of "
                "gensim's test dump, cleaned to plain text")  # fmt: skip
    if str(d.source) == "hf":
        return f"English Wikipedia, the Hugging Face dataset `{d.hf_path}` (`{d.hf_config}`), cleaned text"
    return f"a MediaWiki XML dump (`{Path(str(d.dump_path)).name}`), cleaned to plain text"


def model_card(cfg: Any, mc: Any, arch: str, why: str, step: int, n_params: int, val: Optional[dict]) -> str:
    """The README.md of the export: what the model is, its data and licence, how it was trained,
    what it scored, and how to load it."""
    t, remote = cfg.train, arch == "xlab"
    rows = int(t.batch_size) * int(t.grad_accum)
    tokens = step * rows * int(mc.max_len)
    recipe = f"{t.optimizer}, lr {t.lr:g}" + (f", Muon lr {t.muon_lr:g}" if str(t.optimizer) == "muon" else "")
    recipe += (
        f", {t.lr_schedule} schedule, {t.warmup_steps} warmup steps, weight decay {t.weight_decay:g}, {t.precision}"
    )
    if val:
        score = f"validation loss {val['loss']:.4f} nats per token"
        if val.get("bits_per_byte") is not None:
            score += f", {val['bits_per_byte']:.4f} bits per byte"
        score += f" (step {val['step']})"
    else:
        score = "not recorded with this checkpoint (run `xlab evaluate` on it)"
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")")
    cls = (
        "XLab's own code in this folder (`modeling_xlab.py`, imports nothing from XLab)"
        if remote
        else f"transformers' `{arch}`"
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [xlab]
---
# {t.run_name} (XLab, step {step})

A decoder-only transformer language model trained with XLab, exported for Hugging Face transformers.

- **Architecture**: {cls}{f" ({why})" if why else ""}; {n_params:,} parameters; d_model {mc.d_model},
  {mc.n_layers} layers, {mc.n_heads} heads ({mc.kv_heads} key/value), d_ff {mc.d_ff}, {mc.norm},
  {mc.activation}, {mc.position} positions, context {mc.max_len} tokens, vocabulary {mc.vocab_size}.
- **Data**: {_data_line(cfg)}.
- **Tokens seen**: {tokens:,} ({step:,} steps of {rows} rows of {mc.max_len} tokens per process; times the
  number of processes for a multi-process run).
- **Recipe**: {recipe}.
- **Evaluation**: {score}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
model = {load}
ids = tok("The history of", return_tensors="pt").input_ids  # <s> first, as XLab trains
out = model.generate(ids, max_new_tokens=50, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
```

The tokenizer gives XLab's ids for any text (`add_special_tokens=False` leaves out the leading `<s>`)
and decodes them back exactly with `skip_special_tokens=True`. At most {mc.max_len} positions.

## Licence

{WIKIPEDIA_LICENCE}
"""
