"""lm-evaluation-harness on an HF export: ``simple_evaluate(model="hf")`` on a local task (no
network) reports the loglikelihoods XLab's own scoring gives the same continuations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the lm-eval test needs transformers: pip install -e '.[eval]'")
pytest.importorskip("lm_eval", reason="the lm-eval test needs lm-eval: pip install -e '.[eval]'")

import torch  # noqa: E402
from test_hf_export import save_tiny, tok  # noqa: E402, F401 - the tokenizer fixture

from xlab.generate import reference_nll  # noqa: E402
from xlab.hf import export_hf  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
TASK = Path(__file__).parent / "data" / "lm_eval"


@pytest.mark.slow  # importing lm-eval and its hf model takes most of ~30 s of CPU
def test_lm_eval_loglikelihoods_equal_xlab_scoring(tok, tmp_path):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = save_tiny(tmp_path / "last.pt", tok)
    out = export_hf(tmp_path / "last.pt", tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = (TASK / "xlab_cloze.jsonl").resolve()
    (tasks / "xlab_cloze.yaml").write_text(
        (TASK / "xlab_cloze.yaml").read_text().replace("xlab_cloze.jsonl", str(data))
    )
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},trust_remote_code=True,add_bos_token=True,dtype=float32",
        tasks=["xlab_cloze"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    samples = results["samples"]["xlab_cloze"]
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(samples) == len(docs)
    for s in samples:
        doc = s["doc"]
        theirs = s["resps"][0][0][0]
        # lm-eval's split: the continuation's ids are those of the whole text after the context's.
        context = [tok.sos_id, *tok.encode(doc["context"])]
        whole = [tok.sos_id, *tok.encode(doc["context"] + doc["continuation"])]
        with torch.no_grad():
            ours = -sum(reference_nll(model, whole[: len(context)], whole[len(context) :]))
        assert abs(theirs - ours) <= 1e-4, (doc["title"], theirs, ours)
