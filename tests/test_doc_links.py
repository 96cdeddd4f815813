"""The README's table of contents and the guides' links to their own sections point at headings
that exist (GitHub's anchors: lower case, punctuation dropped, spaces as dashes)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_to_sections_resolve(page):
    text = page.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = page if not target else (page.parent / target).resolve()
        if linked.suffix == ".md" and linked.is_file():
            assert anchor in _anchors(linked), f"{page.name}: #{anchor} is not a heading of {linked.name}"


def test_the_readme_has_a_table_of_contents_of_its_sections():
    text = (REPO / "README.md").read_text()
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    sections = [h for h in re.findall(r"^## (.+)$", text, flags=re.M) if h != "Contents"]
    assert [f"#{_anchor(h)}" for h in sections] == re.findall(r"\]\((#[^)]+)\)", contents)
