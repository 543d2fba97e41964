"""The documents a user reads stay readable and self-contained: README short, lines wrapped, every link inside
the repository and alive, BENCHMARKS.md one section per question (superseded runs live in docs/history.md)."""
from __future__ import annotations

import re

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")
USER_DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def broken_links(path, root=REPO) -> list[str]:
    """Relative links of a markdown file that leave ``root`` or point at nothing; web links are allowed."""
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        if not file.is_relative_to(root.resolve()) or not file.exists():
            bad.append(target)
    return bad


def long_prose_lines(path, width: int = 120) -> list[int]:
    """Line numbers over ``width`` outside tables, code blocks and generated table blocks."""
    long, fenced, generated = [], False, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fenced ^= line.startswith("```")
        generated = (generated or line.startswith("<!-- table:")) and not line.startswith("<!-- /table")
        if len(line) > width and not (fenced or generated or line.startswith("|")):
            long.append(number)
    return long


def test_readme_is_short_wrapped_and_links_only_inside_the_repository():
    readme = REPO / "README.md"
    lines = readme.read_text().splitlines()
    assert len(lines) <= 200
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    assert "../" not in readme.read_text()


def test_every_user_document_links_inside_the_repository_and_wraps_its_prose():
    for path in USER_DOCS:
        assert broken_links(path) == [], path.name
        assert long_prose_lines(path) == [], path.name


def test_the_link_check_catches_a_link_out_of_the_repository_and_a_dead_one(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# probe\n")
    doc = tmp_path / "docs" / "probe.md"
    doc.write_text("[a](../README.md) [b](../../shared/README.md) [c](missing.md) [d](https://example.org)\n")
    assert broken_links(doc, root=tmp_path) == ["../../shared/README.md", "missing.md"]


def test_benchmarks_has_one_section_per_question_and_no_retold_runs():
    headings = [line for line in (REPO / "BENCHMARKS.md").read_text().splitlines() if line.startswith("#")]
    retold = re.compile(r"\b(again|once more|last|after a (second )?fix|uncensored)\b|\(a,", re.I)
    assert [h for h in headings if retold.search(h)] == []
    assert len(headings) == len(set(headings))
