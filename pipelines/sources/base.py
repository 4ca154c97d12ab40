"""What every source of the download stage implements: :class:`Source`, and the row it yields."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from omegaconf import DictConfig

COLUMNS = ("id", "url", "title", "text")  # the output schema, the one of wikimedia/wikipedia
Row = tuple  # (id, url, title, text), all str


class Source:
    """One source of Wikipedia articles (``cfg.data.source``), as the download stage uses it.

    The stage builds the source from ``cfg.data`` (which finds and checks its files: the only
    work done before the up-to-date check), compares :meth:`params` and :meth:`inputs` with its
    manifest, calls :meth:`prepare` when it must download, then writes the rows of :meth:`rows`.

    Attributes:
        name: the value of ``data.source`` that selects it.
        unit: what its progress bar counts: ``"articles"`` or ``xlab.progress.BYTES``.
        no_articles_hint: a sentence added to the error for a source without a single article.
    """

    name: ClassVar[str]
    unit: ClassVar[str]
    no_articles_hint: ClassVar[str] = ""

    def __init__(self, d: DictConfig) -> None:
        self.d = d

    def params(self) -> dict[str, Any]:
        """The source's own parameters for the manifest, beside ``source``, ``max_articles`` and
        ``cleaner_version`` (which every source has)."""
        return {}

    def inputs(self) -> dict[str, str]:
        """The sha256 of each input file, by name, for the manifest (empty: named by the params)."""
        return {}

    def prepare(self) -> None:
        """Work done only when the stage is not up to date, before anything is written."""

    def rows(self, stats: dict[str, Counter], num_proc: int, progress: Any) -> Iterator[Row]:
        """The articles, in source order, as :data:`Row`; counts what it reads into ``stats``
        (one ``Counter`` per file or dataset read: ``pages``, ``articles_read``, ``redirects``,
        ``non_articles``, ``duplicates``, ``empty``, ``parse_errors``) and shows its progress as
        a task of ``progress`` (a :func:`xlab.progress.unit_progress`).

        Raises:
            XLabError: the source cannot be read (one line naming it).
        """
        raise NotImplementedError
