"""The README, docs/ and ARCHITECTURE.md stay true to the code: links resolve, every command parses, every module is
mapped, every docs page is reachable from the README."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bottleneck.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ARCHITECTURE, *DOCS]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose_and_code(path: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each fenced block as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block = (line[3:].strip(), [])
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block[1].append(line)
    return prose, blocks


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose, _ = _prose_and_code(path)
    return {_anchor(line.lstrip("#")) for line in prose if line.startswith("#")}


def _links(path: Path) -> list[str]:
    prose, _ = _prose_and_code(path)
    return [target for line in prose for target in LINK.findall(line) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: {broken}"


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
    readme_links = {(ROOT / target.partition("#")[0]).resolve() for target in _links(README)}
    assert DOCS, "docs/ holds no page"
    for page in DOCS:
        assert page.resolve() in readme_links, f"{page.name} is not linked from the README"
        assert "../README.md" in _links(page), f"{page.name} does not link back to the README"


def _commands(path: Path) -> list[str]:
    """Each `bottleneck ...` command in the page's shell blocks (comments cut, `a && b` split)."""
    commands = []
    for language, lines in _prose_and_code(path)[1]:
        if language != "sh":
            continue
        for line in lines:
            code = re.split(r"\s#", f" {line}", maxsplit=1)[0]
            commands += [part.strip() for part in code.split("&&") if part.strip().startswith("bottleneck ")]
    return commands


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses(page, capsys):
    parser = build_parser()
    wrong = []
    for command in _commands(page):
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            wrong.append(f"{command}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not wrong, f"{page.name}: {wrong}"


def test_the_readme_opens_with_demo_and_test_then_the_five_command_quickstart():
    head = README.read_text().splitlines()[:45]
    text = "\n".join(head)
    assert text.index("make demo") < text.index("make test") < text.index("Quickstart")
    quickstart = _commands(README)[:5]
    assert [shlex.split(c)[1] for c in quickstart] == ["features", "train-head", "report", "predict", "export"]
    assert all(c in text for c in quickstart), "the quickstart is not on the README's first screen"


def test_architecture_names_every_module_and_script():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`([^`]+)`", text))
    command_modules = {module.__name__.rpartition(".")[2] for module in COMMANDS}
    missing = []
    for path in sorted([*(ROOT / "bottleneck").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        rel = path.relative_to(ROOT / "bottleneck" if path.is_relative_to(ROOT / "bottleneck") else ROOT).as_posix()
        folder = rel.rpartition("/")[0] + "/"
        if path.name in ("__init__.py", "__main__.py"):
            continue  # a package's face; its folder has a row (its own logic, if any, is named in that row)
        if rel in named or (folder in named and path.name in named):
            continue
        if folder == "cli/" and path.stem in command_modules:
            continue  # `cli/`: one module per command
        missing.append(rel)
    assert not missing, f"ARCHITECTURE.md does not name: {missing}"
