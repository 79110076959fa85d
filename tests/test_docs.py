"""The documentation holds together: the README stays a front page, every relative link in the markdown files points
at a file of the repository (and, with an #anchor, at a heading of that file), and the README links every docs page.
Plain file reads: no subprocess, no network."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "results" / "README.md"]
    return files + sorted((ROOT / "docs").glob("*.md"))


def prose(text: str) -> str:
    """The text with fenced code blocks blanked, line numbers kept (a link-like text in a code block is no link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but hyphens, spaces and underscores
    removed, each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated heading gets -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image in the prose of a file; a link's text may run over a
    line break."""
    text = prose(path.read_text(encoding="utf-8"))
    # inline code keeps its length (a link's text may be code) but cannot hold a link or close one early
    text = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(text)]


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)) or target.startswith("//")


def link_problems(path: Path) -> list[str]:
    """One line per relative link of `path` whose file does not exist or whose #anchor names no heading."""
    problems = []
    for lineno, target in links(path):
        if not target or is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        where = f"{path.relative_to(ROOT)}:{lineno}: {target}"
        if file_part and dest != ROOT and ROOT not in dest.parents:
            problems.append(f"{where}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, more than {README_MAX_LINES}: move topics to docs/"


def test_the_documents_exist():
    missing = [str(p.relative_to(ROOT)) for p in markdown_files() if not p.is_file()]
    assert missing == []
    assert len(list((ROOT / "docs").glob("*.md"))) >= 2


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings(path):
    assert link_problems(path) == []


def test_readme_links_every_docs_page():
    targets = {t.partition("#")[0] for _, t in links(ROOT / "README.md")}
    pages = sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in targets] == []


# The checks themselves, on hand-made files: each must catch what it is for.


def test_slug_follows_github():
    assert slug("Sweep results") == "sweep-results"
    assert slug("Code execution (opt-in)") == "code-execution-opt-in"
    assert slug("Cost (Table 10)") == "cost-table-10"
    assert slug("The paper's tables and real runs") == "the-papers-tables-and-real-runs"
    assert slug("`obim-merge` and `obim_merge.yaml`") == "obim-merge-and-obim_mergeyaml"
    assert slug("A  B") == "a--b"


def test_a_broken_link_or_anchor_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words\n\n## Two words\n")
    doc = tmp_path / "docs" / "b.md"
    doc.write_text(
        "[ok](a.md) [ok](a.md#two-words) [ok](a.md#two-words-1) [ok](#here) [web](https://example.com/x)\n"
        "![missing image](../img.png) [missing](nope.md) [bad anchor](a.md#three-words)\n"
        "`[not a link](nowhere.md)` [a link over\ntwo lines](gone.md) [outside](../../x.md)\n"
        "```\n[also not a link](nowhere.md)\n```\n"
        "# Here\n"
    )
    problems = link_problems(doc)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "../img.png: no such file",
        "nope.md: no such file",
        "a.md#three-words: no heading with the anchor #three-words in docs/a.md",
        "gone.md: no such file",
        "../../x.md: points outside the repository",
    ]
