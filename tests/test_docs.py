"""The README is a first page and the reference lives in docs/: what a newcomer runs first is there, in
the README, and every link from it reaches a page. (That the site in docs/ builds with no broken link
or anchor is checked by ``mkdocs build --strict`` in scripts/test.sh.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_holds_the_two_commands() -> None:
    assert len(README.splitlines()) <= 200
    block = re.search(r"## Two commands\n.*?```bash\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["scripts/run.sh", "scripts/test.sh"]
    # CI runs the second of them.
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_tables_are_short_and_carry_no_dated_figures() -> None:
    cells = [c for line in README.splitlines() if line.startswith("|") for c in line.split("|")]
    assert max(len(c) for c in cells) <= 300
    assert re.findall(r"\b20\d\d-\d\d-\d\d\b", README) == []  # measured figures live in docs/performance.md


def test_readme_links_reach_pages() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert {link for link in local if link.startswith("docs/")} >= {
        "docs/api.md",
        "docs/configuration.md",
        "docs/operations.md",
    }
    assert [link for link in local if not (ROOT / link).is_file()] == []


def test_the_site_home_page_lists_the_pages_the_readme_lists() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    readme_pages = set(re.findall(r"\]\(docs/([^)#]+)\)", README))
    index_pages = set(re.findall(r"\]\(([a-z_-]+\.md)\)", index))
    assert readme_pages == index_pages
