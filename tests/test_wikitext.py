"""The wikitext cleaner removes nodes where it found them; its text equals that of the rules applied
with mwparserfromhell's own ``Wikicode.remove`` (the cleaner before it was made faster)."""

from pathlib import Path

import pytest

from pipelines import wikitext
from pipelines.sources import sample as sample_source

FIXTURE = Path(__file__).parent / "data" / "mini-dump.xml"


def reference_clean(source: str) -> str:
    """The cleaning rules with ``section.remove(node)``, skipping nodes already gone."""
    import mwparserfromhell

    if not source or not source.strip():
        return ""
    parts = []
    for section in mwparserfromhell.parse(source).get_sections(flat=True, include_lead=True, include_headings=True):
        for link in section.filter_wikilinks(recursive=True):
            title = str(link.title)
            if wikitext._MEDIA_LINK.match(title):
                try:
                    section.remove(link)
                except ValueError:
                    pass
            elif wikitext._CATEGORY_PREFIX.match(title):
                link.text = wikitext._CATEGORY_PREFIX.sub("", link.__strip__() or "")
        for tag in section.filter_tags(recursive=True):
            if str(tag.tag).strip().lower() in wikitext._DROPPED_TAGS:
                try:
                    section.remove(tag)
                except ValueError:
                    pass
        text = wikitext._tidy(wikitext._LEFTOVER_REF.sub("", wikitext._MAGIC_WORD.sub("", section.strip_code())))
        if text:
            parts.append(text)
    return "\n\n".join(parts)


NESTED = [
    "a <table><tr><td>x<table><tr><td>inner</td></tr></table></td></tr></table> b",  # table in table
    "x [[File:A.png|thumb|cap [[File:B.png|in]] <ref>r</ref> [[Category:C]]]] y",  # media in media
    "t<ref>one <ref>two</ref> [[Image:I.jpg]]</ref> u",  # nodes inside a removed ref
    "[[Category:Stars|sort <ref>in the key</ref> text]] after",  # a ref in a category's new text
    "{{Infobox|img=[[File:X.svg|a [[B]]]]|note=<ref name=a>{{cite|t=[[Z]]}}</ref>}} Lead <ref name=a/>.",
    "== H ==\n<ref>a</ref><ref>a</ref> same text twice <ref>a</ref>\n=== I ===\n[[File:S.png]][[File:S.png]]",
    "<table>\n<ref>x</ref>\n</table>\n[[media:M.ogg|[[media:M.ogg]]]] end",
]


@pytest.mark.parametrize("source", NESTED)
def test_nested_removals_give_the_reference_text(source):
    assert wikitext.clean_wikitext(source) == reference_clean(source)


def test_fixture_and_sample_pages_give_the_reference_text():
    pages = list(wikitext.iter_dump_pages(FIXTURE))
    sample = list(wikitext.iter_dump_pages(sample_source.locate_sample_file(sample_source.SAMPLE_DUMP)))
    pages += [p for p in sample if p.is_article][::6]  # 18 real articles, long ones included
    assert len(pages) > 20
    for p in pages:
        assert wikitext.clean_wikitext(p.text) == reference_clean(p.text), p.title
