"""The docs are checked, so they stay true:

- every shell block marked runnable (an HTML comment line `<!-- runnable -->` directly before
  its opening fence) in README.md and docs/*.md runs with exit code 0, in the repository root,
  with this interpreter's bin folder (the project's venv) first on PATH; every page that shows
  shell commands has at least one such block;
- the docs site builds with `mkdocs build --strict` (broken links or anchors, missing pages,
  pages left out of the nav all fail it);
- every relative link in README.md (which the site does not build) points to a file that
  exists, and to a heading that exists in it;
- the reliability table names real tests.

Runnable blocks write only under git-ignored folders (outputs/, data/) or `mktemp -d`, which
points into pytest's temporary folder here, so a run leaves the working tree clean.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
SHELLS = ("bash", "sh", "shell")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a Markdown page, with whether a runnable marker precedes it."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        fence, start = opening["fence"], i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        marked = start > 0 and lines[start - 1].strip() == MARKER
        blocks.append(Block(page, start + 1, opening["lang"], "\n".join(lines[start + 1:i]),
                            marked))
        i += 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [block for page in PAGES for block in fenced_blocks(page) if block.runnable]


def test_every_marker_precedes_a_shell_block():
    """A marker not directly above a shell fence would silently run nothing."""
    problems = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        marked = {b.line - 1 for b in fenced_blocks(page) if b.runnable}  # marker lines
        for number, line in enumerate(lines, 1):
            if line.strip() == MARKER and number not in marked:
                problems.append(f"{page.relative_to(ROOT)}:{number}: marker without a fence "
                                "on the next line")
        problems += [f"{b.where}: runnable block in {b.lang or 'no language'}, not a shell"
                     for b in fenced_blocks(page) if b.runnable and b.lang not in SHELLS]
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_page_with_commands_runs_some_of_them(page):
    blocks = fenced_blocks(page)
    if any(b.lang in SHELLS for b in blocks):
        assert any(b.runnable for b in blocks), (
            f"{page.relative_to(ROOT)} shows shell commands but marks none {MARKER}: mark the "
            "ones that run in seconds, so the tests keep them working")


def _block_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # a Ray instance a command starts keeps Ray's usual session folder, whose socket paths
    # must stay short; everything else temporary (mktemp -d) lands in pytest's folder
    env.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    env["TMPDIR"] = str(tmp_path)
    env.pop("NO_COLOR", None)
    return env


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.where)
def test_runnable_block(block, tmp_path):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=ROOT,
                            env=_block_env(tmp_path), capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{block.where} exited {result.returncode}:\n{block.text}\n--- stdout\n"
        f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


def test_docs_site_builds_strict(tmp_path):
    mkdocs = BIN / "mkdocs"
    assert mkdocs.exists(), f"{mkdocs} missing: install the dev extra (make install-dev)"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    site = tmp_path / "site"
    built = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    pages = {f"{p.stem}/index.html" if p.stem != "index" else "index.html"
             for p in (ROOT / "docs").glob("*.md")}
    assert pages <= built


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify  # what mkdocs uses for heading ids

    outside_code = re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", page.read_text(),
                          flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", outside_code, flags=re.MULTILINE)
    return {slugify(re.sub(r"[`*_]", "", h), "-") for h in headings}


def test_readme_links_point_to_files_that_exist():
    readme = ROOT / "README.md"
    links = LINK.findall(readme.read_text())
    assert links, "README.md has no links"
    broken = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        file = (ROOT / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {path}")
    assert broken == []


def test_reliability_table_names_real_tests():
    """Every `file.py::test_name` in docs/reliability.md is a test function in tests/, so a
    renamed test cannot leave a row unproven."""
    doc = (ROOT / "docs/reliability.md").read_text()
    refs = sorted(set(re.findall(r"`([\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`", doc)))
    assert len(refs) >= 40  # the table is there and parsed
    missing = [f"{file}::{name}" for file, name in refs
               if not (ROOT / "tests" / file).exists()
               or not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / file).read_text(),
                                re.MULTILINE)]
    assert missing == []
