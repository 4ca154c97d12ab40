"""MediaWiki formats: wikitext -> plain text, and a streaming reader of XML dumps.

The cleaner follows the rules of the ``wikimedia/wikipedia`` dataset builder (Hugging Face), so that
text from a dump processed here reads like that dataset: mwparserfromhell parses the page; each
section (lead included, heading kept as its own plain line) is cleaned on its own; ``<ref>`` and
``<table>`` tags and File/Image/Media links are removed; category links stay as their bare name
(the ``Category:`` prefix is dropped); templates and other unprintable code go through
``strip_code``; ``__MAGIC__`` words are deleted; sections are joined by one blank line.
Three deliberate differences: a ``<ref>`` that the parser leaves as literal text (its content has
unbalanced markup) is removed as well; sections that clean to nothing are left out instead of
adding empty paragraphs (a text never starts or ends with blank lines); spaces at the ends of
lines (left by ``== Heading ==`` and ``* item`` markup) are trimmed.

The dump reader streams ``<page>`` elements with :func:`xml.etree.ElementTree.iterparse` and frees
each page once read, so memory stays constant whatever the size of the dump.
"""

from __future__ import annotations

import bz2
import gzip
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional
from urllib.parse import quote

# Bumped whenever the cleaner's output changes, so that stage manifests notice it.
CLEANER_VERSION = 1

_MAGIC_WORD = re.compile(r"__[A-Z]+__")  # behaviour switches such as __NOTOC__, __FORCETOC__
_MEDIA_LINK = re.compile(r"^\s*:?\s*(?:File|Image|Media)\s*:", re.IGNORECASE)
_CATEGORY_PREFIX = re.compile(r"^\s*:?\s*Category\s*:\s*", re.IGNORECASE)
# A <ref> whose content has unbalanced markup (e.g. a stray '' italic close) is not parsed as a
# tag by mwparserfromhell and would survive as literal text; it is removed from the output.
_LEFTOVER_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_BLANK_LINES = re.compile(r"\n{3,}")
_DROPPED_TAGS = frozenset({"ref", "table"})
_REDIRECT_TEXT = re.compile(r"^\s*#REDIRECT", re.IGNORECASE)
# Characters MediaWiki leaves unescaped in page URLs (its wfUrlencode); everything else is %-encoded.
_URL_SAFE = ";@$!*(),/~:"


def clean_wikitext(wikitext: Optional[str]) -> str:
    """Plain text of one page's wikitext, as the ``wikimedia/wikipedia`` builder makes it.

    Args:
        wikitext: the page source (``<text>`` of the dump); None is treated as empty.

    Returns:
        The text: sections separated by ``"\\n\\n"``, each starting with its heading title as a
        plain line (the lead has none). ``""`` when nothing printable is left (the caller drops
        such pages).

    Raises:
        mwparserfromhell.parser.ParserError: when the parser gives up on the page (rare; callers
        count and skip such pages).
    """
    import mwparserfromhell

    if not wikitext or not wikitext.strip():
        return ""
    from mwparserfromhell.nodes import Tag, Wikilink

    code = mwparserfromhell.parse(wikitext)
    parts = []
    for section in code.get_sections(flat=True, include_lead=True, include_headings=True):
        # Collect first, then edit: editing a node list while iterating over it skips nodes.
        for parent, link in _walk(section, Wikilink):
            title = str(link.title)
            if _MEDIA_LINK.match(title):
                _remove(parent, link)
            elif _CATEGORY_PREFIX.match(title):
                # Keep the category's name (or its sort text) in place, without the prefix.
                link.text = _CATEGORY_PREFIX.sub("", link.__strip__() or "")
        for parent, tag in _walk(section, Tag):
            if str(tag.tag).strip().lower() in _DROPPED_TAGS:
                _remove(parent, tag)
        text = _tidy(_LEFTOVER_REF.sub("", _MAGIC_WORD.sub("", section.strip_code())))
        if text:
            parts.append(text)
    return "\n\n".join(parts)


def _tidy(text: str) -> str:
    """Trim spaces at line ends (left by headings ``== H ==`` and list markers ``* x``) and keep
    at most one blank line between paragraphs."""
    lines = (line.strip(" \t") for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _walk(code, kind: type) -> list:
    """``(parent, node)`` for every node of type ``kind`` under ``code``, in the order of
    ``code.filter(recursive=True, forcetype=kind)``; ``parent`` is the Wikicode whose node list
    holds ``node``."""
    out: list = []

    def visit(c) -> None:
        for node in c.nodes:
            if isinstance(node, kind):
                out.append((c, node))
            for child in node.__children__():
                visit(child)

    visit(code)
    return out


def _remove(parent, node) -> None:
    """Remove ``node`` from the node list of ``parent``, where :func:`_walk` found it.

    ``Wikicode.remove(node)`` searches the whole section for the node first, which made removing
    a page's references and tables quadratic in its size (40 % of the cleaning time). A node nested
    in one already removed is popped from its detached parent, which is never printed: the text
    is the same as when it is skipped.
    """
    nodes = parent.nodes
    for i, n in enumerate(nodes):
        if n is node:
            nodes.pop(i)
            return


def page_url(title: str, lang: str = "en") -> str:
    """The article's address, ``https://en.wikipedia.org/wiki/Title_with_underscores``.

    Spaces become underscores and characters that MediaWiki escapes are %-encoded (UTF-8).
    """
    return f"https://{lang}.wikipedia.org/wiki/{quote(title.replace(' ', '_'), safe=_URL_SAFE)}"


@dataclass(frozen=True)
class DumpPage:
    """One ``<page>`` of a MediaWiki XML dump (its last revision)."""

    id: str  # the page id, a decimal string
    title: str
    ns: int  # namespace; 0 is the article namespace
    redirect: bool  # a ``<redirect>`` element, or wikitext starting with ``#REDIRECT``
    text: str  # wikitext of the last ``<revision>``; "" when absent

    @property
    def is_article(self) -> bool:
        """In the article namespace and not a redirect (what the dataset builder keeps)."""
        return self.ns == 0 and not self.redirect


def decompressed(raw: BinaryIO) -> BinaryIO:
    """A reader of ``raw``'s bytes, decompressing bz2 (multistream too) or gzip found by magic bytes.

    ``raw`` must be seekable; ``raw.tell()`` then reports the compressed bytes consumed (progress).
    """
    magic = raw.read(3)
    raw.seek(0)
    if magic == b"BZh":
        return bz2.BZ2File(raw, "rb")
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _local(tag: str) -> str:
    """Tag name without its XML namespace (dump schema versions use different namespaces)."""
    return tag.rpartition("}")[2]


def iter_dump_pages(source: BinaryIO | str | Path) -> Iterator[DumpPage]:
    """Stream the pages of a MediaWiki XML dump in file order, in constant memory.

    Args:
        source: a path (``.xml``, ``.xml.bz2``, ``.xml.gz``; compression found by magic bytes) or
            a binary file object of (decompressed) XML.

    Yields:
        :class:`DumpPage` for every ``<page>``, articles and others alike.

    Raises:
        xml.etree.ElementTree.ParseError: malformed XML (callers turn it into a user error).
    """
    raw = open(source, "rb") if isinstance(source, (str, Path)) else None
    f = decompressed(raw) if raw is not None else source
    try:
        root = None
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if event == "start":
                if root is None:
                    root = elem
                continue
            if _local(elem.tag) != "page":
                continue
            yield _page(elem)
            # Drop the finished page (and anything before it) from the tree: without this the
            # root keeps every page and memory grows with the dump.
            root.clear()
    finally:
        if raw is not None:
            f.close()
            raw.close()


def multistream_index(dump: Path) -> Optional[Path]:
    """The index beside a multistream dump, or None.

    Wikimedia publishes ``<wiki>-<date>-pages-articles-multistream.xml.bz2`` with
    ``<wiki>-<date>-pages-articles-multistream-index.txt.bz2`` beside it; any ``X.xml.bz2`` with an
    ``X-index.txt.bz2`` (or an uncompressed ``X-index.txt``) beside it counts.
    """
    name = dump.name
    if not name.endswith(".xml.bz2"):
        return None
    stem = name[: -len(".xml.bz2")]
    for suffix in ("-index.txt.bz2", "-index.txt"):
        index = dump.with_name(stem + suffix)
        if index.is_file():
            return index
    return None


def stream_offsets(index: Path, dump_size: int) -> list[int]:
    """The byte offsets at which the bz2 streams of a multistream dump start, from its index.

    Each line of the index is ``offset:page_id:title``; the ~100 pages of one stream share its
    offset. The result starts with 0 (the stream holding ``<siteinfo>``, which the index does not
    list) and is strictly increasing.

    Raises:
        ValueError: a line without a decimal offset, offsets out of order or beyond ``dump_size``.
    """
    offsets = [0]
    opener = bz2.open if index.name.endswith(".bz2") else open
    with opener(index, "rb") as f:
        for n, line in enumerate(f, 1):
            head, sep, _ = line.partition(b":")
            if not sep or not head.isdigit():
                if not line.strip():
                    continue
                raise ValueError(f"{index} line {n}: not offset:page_id:title")
            off = int(head)
            if off != offsets[-1]:
                if off < offsets[-1] or off >= dump_size:
                    raise ValueError(f"{index} line {n}: offset {off} out of order or beyond the dump")
                offsets.append(off)
    return offsets


def iter_stream_pages(xml: bytes) -> Iterator[DumpPage]:
    """The pages of one decompressed piece of a multistream dump, in order.

    A piece holds whole ``<page>`` elements without a root; the first also opens ``<mediawiki>``
    and holds ``<siteinfo>``, the last closes ``</mediawiki>``. Both are cut off and the pages are
    parsed inside a root element of their own (pages read by :func:`_local` name, so the dump's
    namespace does not matter).

    Raises:
        xml.etree.ElementTree.ParseError: malformed XML.
    """
    start = xml.find(b"<mediawiki")
    if start >= 0:  # the header: keep what follows <siteinfo>...</siteinfo>
        first = xml.find(b"<page", start)
        xml = xml[first:] if first >= 0 else b""
    end = xml.rfind(b"</mediawiki>")
    if end >= 0:
        xml = xml[:end]
    if not xml.strip():
        return
    root = ET.fromstring(b"<pages>" + xml + b"</pages>")
    for elem in root:
        if _local(elem.tag) == "page":
            yield _page(elem)


def clean_batch(pages: list[tuple[str, str, str]]) -> list[tuple[str, str, Optional[str]]]:
    """Clean ``[(id, title, wikitext), ...]`` into ``[(id, title, text), ...]``, in order.

    ``text`` is ``""`` for a page with nothing printable and None when the parser failed on it.
    A top-level function so that worker processes can run it.
    """
    from mwparserfromhell.parser import ParserError

    out = []
    for pid, title, source in pages:
        try:
            out.append((pid, title, clean_wikitext(source)))
        except ParserError:
            out.append((pid, title, None))
    return out


def _page(elem: ET.Element) -> DumpPage:
    title, ns, pid, redirect, text = "", 0, "", False, ""
    for child in elem:
        name = _local(child.tag)
        if name == "title":
            title = child.text or ""
        elif name == "ns":
            ns = int((child.text or "0").strip())
        elif name == "id":
            pid = (child.text or "").strip()
        elif name == "redirect":
            redirect = True
        elif name == "revision":  # full-history dumps hold several; the last one is current
            text = ""
            for rc in child:
                if _local(rc.tag) == "text":
                    text = rc.text or ""
    if not redirect and _REDIRECT_TEXT.match(text):
        redirect = True  # old dumps mark redirects only in the wikitext
    return DumpPage(id=pid, title=title, ns=ns, redirect=redirect, text=text)
