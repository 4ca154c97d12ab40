"""A Hugging Face Hub dataset (``data.source=hf``): ``data.hf_path`` / ``data.hf_config``, already
clean text, its parquet files read from the Hugging Face cache; offline, from the cache alone. Also
the Hub networking: the reachability probe and its one-line errors."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from pipelines.sources.base import COLUMNS, Row, Source
from xlab.errors import XLabError

if TYPE_CHECKING:
    from omegaconf import DictConfig


class HubSource(Source):
    """The Hub dataset ``data.hf_path`` / ``data.hf_config`` (split ``train``): a dated snapshot,
    named by its params (no input hashes)."""

    name = "hf"
    unit = "articles"  # the rows arrive one article at a time

    def __init__(self, d: DictConfig) -> None:
        super().__init__(d)
        self.offline: Optional[str] = None

    def params(self) -> dict[str, Any]:
        return {"hf_path": self.d.hf_path, "hf_config": self.d.hf_config}

    def prepare(self) -> None:
        # Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the Hub unreachable): read the local
        # cache, and stop with one line, before anything is written, when it does not hold the data.
        self.offline = hub_unreachable_reason(self.d.hf_timeout_s / 3)

    def rows(self, stats: dict[str, Counter], num_proc: int, progress: Any) -> Iterator[Row]:
        d = self.d
        return _hf_rows(d, stats.setdefault(f"{d.hf_path}/{d.hf_config}", Counter()), progress, self.offline)


def _hf_rows(d: Any, c: Counter, progress, offline: Optional[str] = None) -> Iterator[Row]:
    """Rows of the Hub dataset ``d.hf_path`` / ``d.hf_config`` (split ``train``), in dataset order.

    - The whole dataset: its parquet files are fetched into the Hugging Face Hub cache
      (``huggingface_hub.snapshot_download``: resumable, shared with ``datasets``) and read from
      there directly, batch by batch, so no ``datasets`` Arrow copy (about twice the parquet's size)
      is ever written. A repository without parquet files under ``<config>/`` goes through
      ``datasets.load_dataset``.
    - A slice (``d.max_articles``): streamed from the Hub (``streaming=True``), nothing cached.
    - ``offline`` (why the Hub cannot be used: an offline variable set, or no connection): only the
      local cache is read, the Hub cache's parquet files first, else ``datasets``' own cache; when
      neither holds the dataset, one line says so.

    Each HTTP call is bounded by ``d.hf_timeout_s``, and any network failure becomes one line.
    ``progress`` counts the rows read against the dataset's length, or against ``max_articles``
    when the slice is streamed (a stream has no length; the slice ends at that many articles).

    Raises:
        XLabError: the Hub cannot be reached and the cache lacks the dataset, or the load fails.
    """
    # huggingface_hub reads these when imported: bound each HTTP call by the configured time.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(d.hf_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(d.hf_timeout_s)))
    if offline:
        # datasets and huggingface_hub read it when imported: no call then waits on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    files = None
    try:
        if d.max_articles is None or offline:
            files = _hub_parquet_files(d, local_only=offline is not None)
        if files:
            rows: Iterable[dict] = _parquet_rows(files)
            total = sum(_parquet_num_rows(f) for f in files)
        else:
            import datasets

            # A slice streams only what it needs instead of downloading the whole snapshot.
            streaming = d.max_articles is not None and not offline
            ds = datasets.load_dataset(d.hf_path, d.hf_config, split="train", streaming=streaming)
            rows, total = ds, (d.max_articles if streaming else len(ds))
        task = progress.add_task(f"reading {d.hf_path}", total=total)
        for row in rows:
            c["pages"] += 1
            if c["pages"] % 1000 == 0:  # not per row: millions of rows, each a lock and a sample in rich
                progress.update(task, completed=c["pages"])
            c["articles_read"] += 1
            text = row["text"]
            if not text or not text.strip():
                c["empty"] += 1
                continue
            yield (str(row["id"]), row["url"], row["title"], text)
        progress.update(task, completed=c["pages"])
    except XLabError:
        raise
    except Exception as e:  # noqa: BLE001 - the library raises many types; the user needs one line
        if offline and not files:  # datasets' own cache lacks it too
            raise XLabError(_not_cached_message(d, offline)) from None
        if _is_network_error(e):
            raise XLabError(_hub_message(f"{type(e).__name__}")) from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise XLabError(f"cannot load {d.hf_path} {d.hf_config} from the Hub: {type(e).__name__}: {first}") from None


def _hub_parquet_files(d: Any, local_only: bool) -> Optional[list[Path]]:
    """The ``train`` parquet files of ``d.hf_config`` in the Hub cache (fetched first unless
    ``local_only``), in file order; None when the repository (or the cache) has none."""
    from huggingface_hub import snapshot_download

    cfg = d.hf_config
    try:
        root = snapshot_download(
            repo_id=d.hf_path,
            repo_type="dataset",
            allow_patterns=[f"{cfg}/*.parquet", f"*/{cfg}/*.parquet"],
            local_files_only=local_only,
        )
    except Exception as e:  # noqa: BLE001 - nothing cached (LocalEntryNotFoundError) and the like
        if local_only or not _is_network_error(e):
            return None
        raise
    found = sorted(p for p in Path(root).rglob("*.parquet") if p.parent.name == cfg)
    train = [p for p in found if p.name.startswith("train")]
    files = train or found or None
    _check_complete(files or [], d)
    return files


def _check_complete(files: list[Path], d: Any) -> None:
    """Refuse a cached snapshot that lacks some of its ``NAME-<k>-of-<n>.parquet`` files (an
    interrupted download read offline would otherwise give a silently truncated corpus).

    Raises:
        XLabError: one line naming a missing file.
    """
    import re

    parts: dict[tuple[str, int], set[int]] = {}
    for p in files:
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.parquet", p.name)
        if m:
            parts.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
    for (stem, n), have in parts.items():
        missing = sorted(set(range(n)) - have)
        if missing:
            width = len(str(n - 1).zfill(5))
            first = f"{stem}-{missing[0]:0{width}d}-of-{n:0{width}d}.parquet"
            raise XLabError(
                f"the Hugging Face cache holds {len(have)} of the {n} parquet files of {d.hf_path} {d.hf_config} "
                f"(missing {first}{' and more' if len(missing) > 1 else ''}): an interrupted download; "
                "rerun online to complete it"
            )


def _parquet_num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _parquet_rows(files: list[Path]) -> Iterator[dict]:
    """The rows of parquet files in order, as dicts of ``COLUMNS``, read in bounded memory."""
    import pyarrow.parquet as pq

    for path in files:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre_buffer=True keeps every chunk read
        for batch in pf.iter_batches(batch_size=1024, columns=list(COLUMNS)):
            yield from batch.to_pylist()


def _not_cached_message(d: Any, reason: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub ({reason}) and the local cache lacks {d.hf_path} {d.hf_config}; "
        f"download it once with network access, or use `xlab data download --source sample` (built-in "
        f"Wikipedia sample) or `xlab data download --source dump --dump PATH` (a MediaWiki XML dump)"
    )


def _hub_message(reason: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub ({reason}); use `xlab data download --source sample` "
        f"(built-in Wikipedia sample) or `xlab data download --source dump --dump PATH` (a MediaWiki XML dump)"
    )


def _is_network_error(e: BaseException) -> bool:
    names = " ".join(t.__name__ for t in type(e).__mro__)
    return isinstance(e, (ConnectionError, TimeoutError, socket.error)) or any(
        w in names for w in ("Connect", "Timeout", "Offline", "Network")
    )


def hub_unreachable_reason(timeout_s: float) -> Optional[str]:
    """Why the Hub cannot be reached, or None when a TCP connection to it succeeds.

    Honours ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (offline: no attempt), ``HF_ENDPOINT``
    and an ``HTTPS_PROXY`` / ``HTTP_PROXY`` (the proxy is probed instead). Takes at most about
    ``timeout_s`` seconds: the connection runs in a daemon thread, since name resolution
    ignores socket timeouts.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    scheme = endpoint.scheme or "https"
    target = endpoint
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    if proxy and not _no_proxy(endpoint.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or type(e).__name__}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        return f"{host}:{port}: no answer within {timeout_s:g} s"
    return result[0]


def _no_proxy(host: str) -> bool:
    rules = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").split(",")
    return any(r.strip() and (r.strip() == "*" or host.endswith(r.strip().lstrip("."))) for r in rules)
