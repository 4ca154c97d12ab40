"""Scale benchmark: every data stage on synthetic corpora of growing size, and the extrapolation to
full English Wikipedia.

The corpus is the built-in sample (``xlab data download``'s default: the Vital Article summaries
and the gensim dump excerpt, about 7.8 M characters) repeated ``k`` times with fresh ids and titles,
written as a MediaWiki multistream dump (100 pages per bz2 stream) with its index beside it, as
Wikimedia publishes ``pages-articles-multistream.xml.bz2``. For each size every stage runs as its
own ``xlab`` subprocess in a temporary folder, with the full run's data settings
(``conf/xlab.yaml``: vocabulary 32,768, ``seq_len`` 512):

    download (--source dump) -> split -> tokenizer train -> encode -> stats

and is measured for wall time, CPU time (user + system of the process and all its children),
peak resident memory of the whole process tree (psutil, sampled every 50 ms, summed over the
processes alive at each sample) and MB of text per CPU-second. The run fails (exit 1) when a
stage's peak memory grows more than 20 % from the middle size to the largest: every stage must
hold bounded memory whatever the corpus. Tokenizer training is exempt: its memory grows with the
lines it trains on, up to its cap of ``tokenizer.max_sentences`` lines, by design; it is reported
per million lines.

From the two largest sizes (a straight line through their CPU seconds per stage) it extrapolates
to full English Wikipedia (about 20 GB of text, 6.4 M articles) on a 16-core machine: time, memory
and disk per stage, and the full run's padding fraction and tokens per epoch.

Run: ``python bench/scale.py`` (sizes 1, 8, 32: about 20 minutes on 2 cores) or
``python bench/scale.py --sizes 1,8`` (no memory check with two sizes).
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("download", "split", "tokenizer", "encode", "stats")
FULL_TEXT_MB = 20_000  # full English Wikipedia, MB (10^6 characters) of clean text
FULL_ARTICLES = 6.4e6
FULL_CORES = 16
MEMORY_GROWTH_LIMIT = 0.20
MAX_SENTENCES = 2_000_000  # tokenizer.max_sentences, the default conf/xlab.yaml keeps
# How many cores a stage can use on the large machine: download (multistream dump with its index)
# and encode run a worker pool; split and stats are one process; tokenizer training reads the split
# in one process and trains with SentencePiece's threads.
STAGE_CORES = {"download": FULL_CORES, "split": 1, "tokenizer": 1, "encode": FULL_CORES, "stats": 1}


# ------------------------------------------------------------------------------ the corpus
def sample_pages() -> list[tuple[str, int, bool, str]]:
    """The built-in sample as dump pages ``(title, ns, redirect, wikitext)``, in the sample's order:
    the Vital Article summaries (plain prose) without the 46 also in the dump, then every page of
    the gensim dump excerpt (articles, redirects and other namespaces alike)."""
    from pipelines import wikitext
    from pipelines.sources import sample

    summaries = sample.locate_sample_file(sample.SAMPLE_SUMMARIES)
    dump = sample.locate_sample_file(sample.SAMPLE_DUMP)
    dump_pages = list(wikitext.iter_dump_pages(dump))
    in_dump = {p.title for p in dump_pages if p.is_article}
    pages = []
    for key, entry in json.loads(summaries.read_text(encoding="utf-8")).items():
        title = entry.get("title") or key
        text = (entry.get("extract") or "").strip()
        if text and title not in in_dump:
            pages.append((title, 0, False, text))
    pages += [(p.title, p.ns, p.redirect, p.text) for p in dump_pages]
    return pages


def write_multistream_dump(path: Path, pages: list, copies: int, per_stream: int = 100) -> int:
    """Write ``copies`` copies of ``pages`` (copy k's titles suffixed `` (k)``, ids renumbered) as a
    multistream dump at ``path`` and its index beside it; returns the dump's size in bytes."""
    header = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
        "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <dbname>enwiki</dbname>\n  </siteinfo>\n"
    )
    index = path.with_name(path.name.replace(".xml.bz2", "-index.txt.bz2"))
    offset = 0
    with open(path, "wb") as out, bz2.open(index, "wt", encoding="utf-8") as idx:

        def stream(text: str) -> None:
            nonlocal offset
            data = bz2.compress(text.encode("utf-8"), 9)
            out.write(data)
            offset += len(data)

        stream(header)
        buf, entries, pid = [], [], 0
        for k in range(copies):
            for title, ns, redirect, text in pages:
                pid += 1
                t = title if k == 0 else f"{title} ({k})"
                red = f"    <redirect title={quoteattr(t)} />\n" if redirect else ""
                buf.append(
                    f"  <page>\n    <title>{escape(t)}</title>\n    <ns>{ns}</ns>\n    <id>{pid}</id>\n{red}"
                    f"    <revision>\n      <id>{pid}</id>\n"
                    f'      <text xml:space="preserve">{escape(text)}</text>\n    </revision>\n  </page>\n'
                )
                entries.append(f"{pid}:{t}")
                if len(buf) == per_stream:
                    idx.writelines(f"{offset}:{e}\n" for e in entries)
                    stream("".join(buf))
                    buf, entries = [], []
        if buf:
            idx.writelines(f"{offset}:{e}\n" for e in entries)
            stream("".join(buf))
        stream("</mediawiki>\n")
    return offset


# ---------------------------------------------------------------------------- measurement
class TreeSampler:
    """Peak resident memory of a process and its descendants, sampled every ``interval`` s: the
    peak of the tree's sum, and the peaks of the root alone and of its descendants' sum."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = self.peak_root = self.peak_children = 0
        self.max_procs = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                kids = self.root.children(recursive=True)
                root = self.root.memory_info().rss
            except psutil.Error:
                break
            child = 0
            for p in kids:
                try:
                    child += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_root = max(self.peak_root, root)
            self.peak_children = max(self.peak_children, child)
            self.peak = max(self.peak, root + child)
            self.max_procs = max(self.max_procs, 1 + len(kids))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(args: list[str], cwd: Path, log: Path) -> dict:
    """Run ``xlab ARGS``; its wall and CPU seconds (the whole tree) and peak memory (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "xlab", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env
        )
        sampler = TreeSampler(p.pid)
        rc = p.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"FAILED: xlab {' '.join(args)} exited {rc}; see {log}:\n{log.read_text()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": sampler.peak / 1e6,
        "main_mb": sampler.peak_root / 1e6,
        "workers_mb": sampler.peak_children / 1e6,
        "procs": sampler.max_procs,
    }


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path``)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_size(work: Path, pages: list, k: int, num_proc: int) -> dict:
    """Build the x``k`` corpus in ``work`` and run every stage on it."""
    work.mkdir(parents=True)
    dump = work / f"synthetic-x{k}-pages-articles-multistream.xml.bz2"
    t0 = time.perf_counter()
    dump_bytes = write_multistream_dump(dump, pages, k)
    build_s = time.perf_counter() - t0
    common = [
        "-c",
        str(ROOT / "conf" / "xlab.yaml"),
        "-o",
        "data.name=scale",
        "-o",
        f"paths.data_dir={work / 'data'}",
        "-o",
        f"paths.tokenizer_dir={work / 'tok'}",
        "-o",
        f"paths.shards_dir={work / 'shards'}",
        "-o",
        f"data.num_proc={num_proc}",
        "-o",
        f"shards.num_proc={num_proc}",
    ]
    cmds = {
        "download": ["data", "download", "--source", "dump", "--dump", str(dump)],
        "split": ["data", "split"],
        "tokenizer": ["tokenizer", "train"],
        "encode": ["data", "encode"],
        "stats": ["stats"],
    }
    outputs = {
        "download": work / "data" / "raw" / "scale",
        "split": work / "data" / "splits" / "scale",
        "tokenizer": work / "tok",
        "encode": work / "shards" / "scale",
        "stats": None,
    }
    log = work / "stages.log"
    res = {"k": k, "dump_bytes": dump_bytes, "build_s": build_s, "stages": {}}
    for stage in STAGES:
        r = run_stage([*cmds[stage], *common], ROOT, log)
        r["disk_bytes"] = du(outputs[stage]) if outputs[stage] is not None else 0
        res["stages"][stage] = r
        print(
            f"  x{k:<3} {stage:<10} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
            f"peak {r['peak_mb']:7.0f} MB ({r['procs']} processes)",
            flush=True,
        )
    raw = json.loads((work / "data" / "raw" / "scale" / "manifest.json").read_text())
    res["articles"] = raw["counts"]["articles"]
    res["text_mb"] = raw["counts"]["characters"] / 1e6
    tok = json.loads((work / "tok" / "scale.json").read_text())
    res["tokenizer_lines"] = _find(tok, "lines") or _find(tok, "sentences")
    store = json.loads((work / "shards" / "scale" / "manifest.json").read_text())
    res["store"] = _store_counts(store)
    return res


def _find(d, key):
    """The first value of ``key`` anywhere in a nested dict (manifests differ in layout)."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key and isinstance(v, (int, float)):
                return v
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _store_counts(store: dict) -> dict:
    """Rows, target tokens (positions the loss scores) and text bytes of a shard store, all splits,
    and the train split's layout."""
    splits = store["splits"].values()
    return {
        "seq_len": int(store["seq_len"]),
        "rows": sum(int(s["rows"]) for s in splits),
        "targets": sum(int(s["target_tokens"]) for s in splits),
        "text_bytes": sum(int(s.get("text_bytes", 0)) for s in splits),
        "train_layout": store["splits"].get("train", {}).get("layout", "padded"),
    }


# ----------------------------------------------------------------------------------- report
def table(results: list[dict]) -> str:
    lines = [
        "| size | text (M chars) | stage | wall (s) | CPU (s) | peak memory, process tree (MB) | MB/s per core |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for stage in STAGES:
            s = r["stages"][stage]
            rate = r["text_mb"] / s["cpu_s"] if s["cpu_s"] > 0 else float("inf")
            lines.append(
                f"| x{r['k']} | {r['text_mb']:.1f} | {stage} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | "
                f"{s['peak_mb']:,.0f} | {rate:.2f} |"
            )
    return "\n".join(lines)


def memory_check(results: list[dict]) -> list[str]:
    """Stages whose peak memory grew more than the limit from the middle size to the largest."""
    if len(results) < 3:
        return []
    mid, big = results[len(results) // 2], results[-1]
    bad = []
    for stage in STAGES:
        a, b = mid["stages"][stage]["peak_mb"], big["stages"][stage]["peak_mb"]
        growth = b / a - 1
        exempt = stage == "tokenizer"  # grows with the lines it trains on, up to max_sentences: by design
        note = " (lines trained on, capped by max_sentences: not checked)" if exempt else ""
        print(f"  {stage:<10} x{mid['k']} {a:7.0f} MB -> x{big['k']} {b:7.0f} MB: {growth:+.1%}{note}")
        if growth > MEMORY_GROWTH_LIMIT and not exempt:
            bad.append(f"{stage}: {a:.0f} -> {b:.0f} MB ({growth:+.0%})")
    return bad


def extrapolate(results: list[dict], num_proc: int) -> str:
    """Time, memory and disk per stage for full English Wikipedia on ``FULL_CORES`` cores."""
    a, b = (results[-2], results[-1]) if len(results) >= 2 else (results[-1], results[-1])
    scale = FULL_TEXT_MB / b["text_mb"]
    lines = [
        f"| stage (full English Wikipedia, ~{FULL_TEXT_MB / 1000:.0f} GB of text, {FULL_CORES} cores) | "
        "CPU (core-hours) | time | memory (GB) | disk (GB) |",
        "|---|---|---|---|---|",
    ]
    total_s = 0.0
    for stage in STAGES:
        sa, sb = a["stages"][stage], b["stages"][stage]
        # CPU seconds per MB from the two largest sizes: the slope, plus the fixed cost once.
        if b["text_mb"] > a["text_mb"]:
            slope = max(0.0, (sb["cpu_s"] - sa["cpu_s"]) / (b["text_mb"] - a["text_mb"]))
            fixed = max(0.0, sb["cpu_s"] - slope * b["text_mb"])
        else:
            slope, fixed = sb["cpu_s"] / b["text_mb"], 0.0
        cpu = fixed + slope * FULL_TEXT_MB
        cores = STAGE_CORES[stage]
        if stage == "tokenizer":
            # SentencePiece trains on at most max_sentences lines: beyond the cap only the pass over
            # the split grows; one process.
            cores = 1
        seconds = cpu / cores
        total_s += seconds
        if stage == "tokenizer" and b.get("tokenizer_lines") and a.get("tokenizer_lines"):
            # Memory grows with the lines trained on, up to max_sentences (2 M by default).
            full_lines = min(MAX_SENTENCES, b["tokenizer_lines"] * scale)
            per_line = max(0.0, (sb["peak_mb"] - sa["peak_mb"]) / max(1, b["tokenizer_lines"] - a["tokenizer_lines"]))
            mem = sb["peak_mb"] + per_line * max(0.0, full_lines - b["tokenizer_lines"])
        elif STAGE_CORES[stage] > 1 and sb["procs"] > 1:
            workers = max(1, min(num_proc, sb["procs"] - 1))
            mem = sb["main_mb"] + sb["workers_mb"] * FULL_CORES / workers
        else:
            mem = sb["peak_mb"]
        disk = sb["disk_bytes"] * scale / 1e9
        lines.append(f"| {stage} | {cpu / 3600:.2f} | {_hms(seconds)} | {mem / 1000:.1f} | {disk:.1f} |")
    lines.append(f"| **all data stages** | | **{_hms(total_s)}** | | |")
    lines.append(
        "(time: CPU / the cores a stage uses; linear in the text, so an upper bound for tokenizer training, "
        "whose SentencePiece part stops growing at max_sentences lines; memory: the largest size's peak, with "
        "16 workers for download and encode and max_sentences lines for the tokenizer)"
    )
    return "\n".join(lines)


def real_wikitext_download() -> str:
    """The download stage for a real dump: the rate at which the sample dump's articles (real
    wikitext) clean, and the ratio of their clean text to their wikitext, scaled to full English
    Wikipedia on 16 cores (the synthetic corpus is mostly plain prose, which cleans much faster)."""
    from pipelines import wikitext
    from pipelines.sources import sample

    texts = [p.text for p in wikitext.iter_dump_pages(sample.locate_sample_file(sample.SAMPLE_DUMP)) if p.is_article]
    t0 = time.process_time()
    clean = [wikitext.clean_wikitext(t) for t in texts]
    cpu = time.process_time() - t0
    src_mb, out_mb = sum(map(len, texts)) / 1e6, sum(map(len, clean)) / 1e6
    full_src = FULL_TEXT_MB * src_mb / out_mb
    seconds = full_src / (src_mb / cpu) / FULL_CORES
    return (
        f"real wikitext (the sample dump's {len(texts)} articles): {src_mb / cpu:.2f} MB of wikitext per CPU-second, "
        f"{out_mb / src_mb:.2f} characters of text per character of wikitext; full English Wikipedia: about "
        f"{full_src / 1000:.0f} GB of article wikitext, {full_src / (src_mb / cpu) / 3600:.1f} core-hours of cleaning, "
        f"{_hms(seconds)} on {FULL_CORES} cores (multistream dump with its index)"
    )


def padding_report(results: list[dict]) -> str:
    """The store's padding fraction and tokens per epoch at the largest size, and for full English
    Wikipedia at the same tokens per character and padding fraction."""
    r = results[-1]
    st = r["store"]
    positions = st["rows"] * st["seq_len"]  # input positions per epoch, pads included
    pad = 1 - st["targets"] / positions
    tok_per_char = st["targets"] / (r["text_mb"] * 1e6)
    full = tok_per_char * FULL_TEXT_MB * 1e6
    return (
        f"store at seq_len {st['seq_len']} (x{r['k']}, train split {st['train_layout']}): {st['rows']:,} rows, "
        f"{positions:,} positions per epoch, {st['targets']:,} of them scored: padding {pad:.1%}; "
        f"{tok_per_char:.3f} tokens per character, {st['text_bytes'] / st['targets']:.2f} bytes per token.\n"
        f"full English Wikipedia at seq_len {st['seq_len']}: about {full / 1e9:.1f} B tokens per epoch "
        f"({full / (1 - pad) / 1e9:.1f} B positions with padding {pad:.1%}, as in the sample)"
    )


def tokenizer_memory(results: list[dict]) -> str:
    """Tokenizer training's peak memory per million training lines (the slope between the two
    largest sizes); its cap, ``tokenizer.max_sentences`` lines, bounds it whatever the corpus."""
    out = [
        f"tokenizer x{r['k']}: {r['tokenizer_lines'] or 0:,} lines, {r['stages']['tokenizer']['peak_mb']:,.0f} MB peak"
        for r in results
    ]
    if len(results) >= 2 and results[-1]["tokenizer_lines"] and results[-2]["tokenizer_lines"]:
        a, b = results[-2], results[-1]
        dl = (b["tokenizer_lines"] - a["tokenizer_lines"]) / 1e6
        dm = b["stages"]["tokenizer"]["peak_mb"] - a["stages"]["tokenizer"]["peak_mb"]
        if dl > 0:
            out.append(f"tokenizer training: about {dm / dl:,.0f} MB per million lines (x{a['k']} -> x{b['k']})")
    return "\n".join(out)


def full_article_padding(work: Path, k: int, seq_len: int) -> str:
    """Padding at ``seq_len`` of the sample's full articles alone (the gensim dump's 106, whole
    articles as in full Wikipedia, unlike the Vital Article lead sections), tokenized with the
    tokenizer trained at size ``k``."""
    from pipelines import wikitext
    from pipelines.sources import sample
    from xlab.tokenizer import Tokenizer

    tok = Tokenizer.load(work / f"x{k}" / "tok" / "scale.model")
    dump = sample.locate_sample_file(sample.SAMPLE_DUMP)
    pages = wikitext.iter_dump_pages(dump)
    texts = [t for t in (wikitext.clean_wikitext(p.text) for p in pages if p.is_article) if t]
    targets = positions = 0
    for ids in tok.encode(texts):
        n = len(ids) + 1  # <sos> t1..tn <eos>: n + 1 targets
        targets += n
        positions += -(-n // seq_len) * seq_len
    return (
        f"the sample's {len(texts)} full articles alone at seq_len {seq_len}: padding {1 - targets / positions:.1%} "
        f"({targets / len(texts):,.0f} tokens per article)"
    )


def _hms(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,32", help="copies of the sample, comma-separated (default 1,8,32)")
    ap.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the corpora (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_proc = args.num_proc or cores
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {cores} cores; sizes {sizes}")
    pages = sample_pages()
    work = args.work or Path(tempfile.mkdtemp(prefix="xlab-scale-"))
    results = []
    try:
        for k in sizes:
            shutil.rmtree(work / f"x{k}", ignore_errors=True)
            results.append(run_size(work / f"x{k}", pages, k, num_proc))
            for folder in ("data", "shards"):  # disk: the figures are taken, the tokenizer stays
                shutil.rmtree(work / f"x{k}" / folder, ignore_errors=True)
            (work / f"x{k}" / f"synthetic-x{k}-pages-articles-multistream.xml.bz2").unlink(missing_ok=True)
        articles_note = full_article_padding(work, sizes[-1], results[-1]["store"]["seq_len"])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(table(results))
    print()
    print(tokenizer_memory(results))
    print()
    print(extrapolate(results, num_proc))
    print(real_wikitext_download())
    print()
    print(padding_report(results))
    print(articles_note)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print()
    bad = memory_check(results)
    if bad:
        print("FAIL: peak memory grows with the corpus: " + "; ".join(bad))
        return 1
    if len(results) >= 3:
        print(f"memory: no stage grows more than {MEMORY_GROWTH_LIMIT:.0%} from the middle size to the largest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
