"""Every relative link and #anchor in README.md and docs/ must resolve, as GitHub renders them.

The README is the front door and points into docs/; a section renamed or moved must not leave a
dead link behind. External links (http:, mailto:) are not fetched: CI has no internet.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); link text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, where Markdown is rendered."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lower-cased, punctuation
    dropped except '-' and '_', spaces turned into '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return "".join(c for c in text.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition in prose."""
    targets = []
    for number, line in prose_lines(page.read_text()):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append((number, definition.group(1)))
            continue
        # Code spans are not Markdown: a `[x](y)` inside backticks is not a link.
        prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets += [(number, m.group(1)) for m in INLINE_LINK.finditer(prose)]
    return targets


def broken_links(page: Path) -> list[str]:
    """Why each relative link of `page` does not resolve ("README.md:12: docs/x.md: no such file")."""
    problems = []
    for number, target in link_targets(page):
        if SCHEME.match(target):
            continue  # external: not checked offline
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not path_part and not anchor:
            problems.append(f"{where}: empty link")
        elif ROOT not in (resolved, *resolved.parents):
            problems.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_fences_are_closed(page):
    """An unclosed fence renders the rest of the page as code, links and headings included."""
    fences = [n for n, line in enumerate(page.read_text().splitlines(), 1) if FENCE.match(line)]
    assert len(fences) % 2 == 0, f"{page.name}: the fence on line {fences[-1]} is never closed"


def test_docs_pages_exist_and_readme_links_each_of_them():
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in link_targets(ROOT / "README.md")}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []


@pytest.mark.parametrize("heading, expected", [
    ("Deployment: Docker on Xeon hosts", "deployment-docker-on-xeon-hosts"),
    ("config.properties (TorchServe frontend)", "configproperties-torchserve-frontend"),
    ("Per-layer error: `make quant-report`", "per-layer-error-make-quant-report"),
    ("Speed and accuracy (measured)", "speed-and-accuracy-measured"),
    ("What is fast on which CPU", "what-is-fast-on-which-cpu"),
    ("The [OpenAI](https://openai.com) API", "the-openai-api"),
    ("snake_case stays", "snake_case-stays"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_reports_missing_files_and_anchors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## Same\n\n## Same\n\n```\n[not a link](nowhere.md)\n```\n"
                                   "[ok](#same-1) [code `x`](b.md) [bad](b.md#nope) [gone](c.md) "
                                   "`[span](nowhere.md)` [ext](https://example.com/x)\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links(tmp_path / "a.md") == [
        "a.md:10: b.md#nope: no heading with anchor #nope in b.md",
        "a.md:10: c.md: no such file",
    ]
