"""Every relative link in the README, CHANGELOG and docs/ reaches a file, and its #anchor a heading.

docs/results.md is regenerated from its manifest, and sections move to CHANGELOG.md: a link to a
heading that moved fails here instead of leaving the reader at the top of a page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "tests" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
FENCE = re.compile(r"```.*?```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as '-',
    a repeated heading suffixed -1, -2, ..."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#+ (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file or heading does not exist."""
    broken = []
    for link in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no such heading in {path.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_reaches_its_file_and_heading(page):
    assert broken_links(page) == []


def test_a_moved_heading_is_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Results\n\n## Client-level DP: many small sites\n\n## Notes\n\n## Notes\n"
    )
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#client-level-dp-many-small-sites) [second](a.md#notes-1) [code](x.md)\n"
        "[gone](a.md#secure-aggregation-cost) [missing](c.md) [web](https://example.org/x#y)\n"
        "```\n[in a code block](nowhere.md)\n```\n"
    )
    (tmp_path / "x.md").write_text("")
    assert broken_links(page) == [
        "a.md#secure-aggregation-cost: no such heading in a.md",
        "c.md: no such file",
    ]
