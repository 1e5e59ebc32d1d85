"""The README is the front door and docs/ a MkDocs site: short README, links that resolve, a site that
builds in strict mode, and a command reference that is the command line's own help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[str]:
    """The targets of the Markdown links of ``path`` that point at a file of the repository."""
    targets = LINK.findall(_prose(path.read_text()))
    return [t for t in targets if not t.startswith(EXTERNAL)]


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in its order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from walk(value) if isinstance(value, list) else [value]

    return list(walk(config["nav"]))


def test_links_are_found():
    assert relative_links(README), "the README links to the docs pages"
    page = DOCS / "index.md"
    assert "algorithm.md" in relative_links(page)
    assert not [t for t in relative_links(page) if t.startswith("http")]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move the detail into docs/"


def test_readme_keeps_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text(), "the README's test command is the one CI runs"


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in relative_links(page):
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_docs_links_stay_inside_docs():
    """MkDocs serves docs/ only: a link out of it is a broken link on the site (write the path in backticks)."""
    outside = [f"{page.name}: {t}" for page in sorted(DOCS.glob("*.md")) for t in relative_links(page)
               if not (page.parent / t.split("#")[0]).resolve().is_relative_to(DOCS)]
    assert outside == []


def test_every_page_is_in_the_nav():
    assert sorted(nav_pages()) == sorted(p.name for p in DOCS.glob("*.md"))


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "index.html").is_file()


def test_the_reference_is_the_command_lines_own():
    from evit_cli.cli import reference

    text = reference.markdown()
    assert (DOCS / "reference.md").read_text() == text, (
        "docs/reference.md is stale: python -m evit_cli.cli.reference > docs/reference.md")
    for command in ("convert", "bench", "finetune", "eval", "sweep", "search", "visualize", "export", "info"):
        assert f"\n## evit {command}\n" in text
    assert "| `--keep-rate`, `-k` |" in text
