"""The user guide (docs/guide/) shows only what exists.

Every ``midasflow …`` command line in a page's shell blocks parses with the real command's parser
(nothing is run); every flag in inline code exists in some command's parser (or is a MIDAS
parameter key); every link and picture resolves; every output block has the example that made
it (``docs/guide/make_examples.py`` runs them and pastes their output).
"""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from midasflow.cli import COMMANDS
from midasflow.cli._common import option_strings, parse_command
from midasflow.errors import UsageError
from midasflow.params import is_known_key

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide"
PAGES = sorted(GUIDE.glob("*.md"))
#: Commands that take MIDAS ``Key value`` overrides after their flags.
TAKES_OVERRIDES = {"integrate", "run"}
_FENCE = re.compile(r"(?:<!-- run: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
_SHELL_END = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def parser_of(command: str):
    return importlib.import_module(COMMANDS[command][0]).build_parser()


def command_lines(page: Path) -> list[str]:
    """The ``midasflow`` command lines of the page's shell blocks (continuations joined; blocks of
    deliberate mistakes, ``run: *-errors``, left out)."""
    lines = []
    for m in _FENCE.finditer(page.read_text()):
        if m["lang"] not in ("bash", "sh", "console") or (m["name"] or "").endswith("-errors"):
            continue
        for line in m["code"].replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s&&\s", line):
                if part.startswith("midasflow "):
                    lines.append(part)
    return lines


def argv_of(line: str) -> list[str]:
    tokens = shlex.split(line, comments=True)
    for k, token in enumerate(tokens):
        if token in _SHELL_END:
            return tokens[:k]
    return tokens


def all_flags() -> set[str]:
    return {flag for command in COMMANDS for flag in option_strings(parser_of(command))}


def inline_code(page: Path) -> list[str]:
    """Inline code spans outside fenced blocks."""
    prose = _FENCE.sub("", page.read_text())
    return re.findall(r"`([^`\n]+)`", prose)


def test_the_guide_has_its_pages():
    names = {p.stem for p in PAGES}
    assert {"index", "demo", "integrate", "refine", "run", "check", "stream"} <= names
    index = (GUIDE / "index.md").read_text()
    for page in PAGES:
        if page.stem != "index":
            assert f"({page.name})" in index, f"index.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_parses(page: Path):
    for line in command_lines(page):
        argv = argv_of(line)
        command = argv[1]
        assert command in COMMANDS, f"{page.name}: unknown command in {line!r}"
        try:
            parse_command(parser_of(command), argv[2:], overrides=command in TAKES_OVERRIDES)
        except UsageError as exc:
            pytest.fail(f"{page.name}: {line!r}: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_inline_flag_exists(page: Path):
    known = all_flags()
    for span in inline_code(page):
        words = span.split()
        if not words or not (words[0].startswith("-") or words[0] == "midasflow"):
            continue
        if words[0] == "midasflow" and len(words) > 1:
            assert words[1] in COMMANDS or words[1].startswith("-"), f"{page.name}: `{span}`"
            flags = set(option_strings(parser_of(words[1]))) if words[1] in COMMANDS else known
        else:
            flags = known
        for flag in _FLAG.findall(span):
            assert flag in flags or is_known_key(flag), f"{page.name}: `{span}`: no flag {flag}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_pictures_resolve(page: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link to missing {target}"
        if path.suffix == ".png":
            assert path.stat().st_size < 150 * 1024, f"{target} is over 150 KB"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_output_has_its_example(page: Path):
    text = page.read_text()
    runs = set(re.findall(r"<!-- run: ([\w-]+) -->", text))
    for name, body in re.findall(r"<!-- output: ([\w-]+)[^>]*-->\n```text\n(.*?)```", text, re.S):
        assert name in runs, f"{page.name}: output {name!r} has no run block"
        assert body.strip(), f"{page.name}: output {name!r} is empty: run docs/guide/make_examples.py"


def test_the_checks_catch_a_wrong_flag(tmp_path: Path):
    """The parse refuses a misspelt flag and a missing required one (so the tests above can fail)."""
    page = tmp_path / "bad.md"
    page.write_text("```bash\nmidasflow refine --data x.zarr.zip --cif a.cif --max-rwpp 5\n```\n")
    (line,) = command_lines(page)
    with pytest.raises(UsageError, match="--max-rwp"):
        parse_command(parser_of("refine"), argv_of(line)[2:])
    with pytest.raises(UsageError):
        parse_command(parser_of("check"), ["--cif", "a.cif"])
    assert "--max-rwpp" not in all_flags() and "--max-rwp" in all_flags()


def test_readme_links_the_guide():
    readme = (GUIDE.parent.parent / "README.md").read_text()
    assert "docs/guide/index.md" in readme


def test_make_examples_pastes_what_a_reader_would_see(tmp_path: Path):
    """The regeneration script's trimming: progress bars cut to their last line, the work folder
    left out of paths, head/tail with an ellipsis between."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", GUIDE / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work = tmp_path / "w"
    text = (f"refine-lineout [#.....] 1/4  ok 1\nrefine-lineout [######] 4/4  ok 4\n"
            f"results: {work}/refined/results.zarr\nline a\nline b\nline c\n")
    assert module.tidy(text, work, "") == ("refine-lineout [######] 4/4  ok 4\nresults: refined/results.zarr\n"
                                           "line a\nline b\nline c\n")
    assert module.tidy(text, work, " head=1 tail=2") == "refine-lineout [######] 4/4  ok 4\n…\nline b\nline c\n"
    page = tmp_path / "p.md"
    page.write_text("<!-- run: x -->\n```bash\nmidasflow demo\n```\n")
    assert module.examples(page) == [("x", "bash", "midasflow demo\n")]
