"""The README and docs/*.md link only to files (and headings) the repository has.

A link to a document outside the repository, or to a file since renamed, sends a new
contributor nowhere; so does a heading anchor that no longer exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target), an optional "title" after the target; not inside code.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"```.*?```", flags=re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def links(document: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", document.read_text()))
    return LINK.findall(text)


def heading_anchors(document: Path) -> set[str]:
    """GitHub's anchors: the heading lower-cased, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in FENCE.sub("", document.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_the_documents_are_found():
    assert REPO / "README.md" in DOCUMENTS and REPO / "docs" / "design.md" in DOCUMENTS


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file(document):
    broken = []
    for target in links(document):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{document.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_points_to_the_design_notes_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "docs/design.md" in {target.partition("#")[0] for target in links(REPO / "README.md")}
    assert "DESIGN.md" not in readme  # the team's notes outside the repository are not the reader's


def test_link_finder_sees_links_and_skips_code(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        'See [a](a.md#top) and ![img](images/p.png "title").\n'
        "`[not](code.md)`\n```\n[neither](fenced.md)\n```\n## Top\n"
    )
    assert links(doc) == ["a.md#top", "images/p.png"]
    assert heading_anchors(doc) == {"top"}
