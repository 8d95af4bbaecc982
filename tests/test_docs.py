"""The documentation is true to the repository: README.md and docs/*.md.

- Every relative link resolves: the file (or directory) exists, and a ``#anchor`` matches a heading
  of the target page by GitHub's slug rules (lowercase; every character that is not a letter, digit,
  ``_``, ``-`` or space removed; spaces to ``-``; a repeated heading gets ``-1``, ``-2``, ...).
  Links to other sites are not fetched.
- Every ``python -m <module>`` shown in a fenced code block or an inline code span can be imported
  (``importlib.util.find_spec``), and so can the module of ``torchrun ... -m <module>``.
- Every ``--flag`` written after such a module appears in that module's ``--help`` output:
  ``python -m <module> --help`` in a subprocess with the repository on PYTHONPATH, once per module,
  all in parallel; then ``python -m <module> <subcommand> --help`` where the flags are a
  subcommand's (``launch node``). Flags of torchrun, srun, sbatch, make and pip themselves (written
  before ``-m``, or on lines of their own) are not checked, nor are the arguments of a user program
  that follows the module (after a ``*.py`` file or a second ``-m``).

No module is skipped: ``slurm.submit`` and ``slurm.testbed`` need a cluster or root to do anything,
but their ``--help`` runs anywhere. Keep this file fast (well under a minute): only modules with
flags shown are asked for ``--help``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
PYTHON_M = re.compile(r"(?:^|[\s;&|(])(?:\S*/)?python(?:3(?:\.\d+)*)?\s+-m\s+([A-Za-z_][\w.]*)(.*)$")
TORCHRUN_M = re.compile(r"\s-m\s+([A-Za-z_][\w.]*)(.*)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
COMMAND_END = {";", "&&", "||", "|", "&"}
CHOICES = re.compile(r"\{([\w-]+(?:,[\w-]+)+)\}")


# --- reading the pages ----------------------------------------------------------------------

@dataclass
class Page:
    path: Path
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, text) outside fences
    code: list[tuple[int, str]] = field(default_factory=list)  # (line number, text) inside fences

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    @property
    def paragraphs(self) -> list[tuple[int, str]]:
        """Prose lines joined up to each blank line (a link or a code span may wrap), each with the
        number of its first line."""
        joined: list[tuple[int, str]] = []
        previous = -1
        for number, line in self.prose:
            table_row = line.lstrip().startswith("|") or joined and joined[-1][1].startswith("|")
            if joined and line.strip() and number == previous + 1 and not HEADING.match(line) and not table_row:
                joined[-1] = (joined[-1][0], joined[-1][1] + " " + line.strip())
            elif line.strip():
                joined.append((number, line.strip()))
            previous = number if line.strip() else -1
        return joined


def read_page(path: Path) -> Page:
    page = Page(path)
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        mark = FENCE.match(line)
        if fence is None and mark:
            fence = mark.group(1)
        elif fence is not None and mark and mark.group(1) == fence:
            fence = None
        elif fence is None:
            page.prose.append((number, line))
        else:
            page.code.append((number, line))
    return page


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's rendered text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits and _ (Unicode), as GitHub keeps them
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    seen: Counter[str] = Counter()
    found: set[str] = set()
    for _, line in page.prose:
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if not heading:
            continue
        slug = github_slug(heading.group(2))
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def links(page: Page) -> list[tuple[int, str]]:
    found = []
    for number, text in page.paragraphs:
        text = INLINE_CODE.sub("", text)  # `[x](y)` inside code is not a link
        found += [(number, target) for target in LINK.findall(text)]
    for number, line in page.prose:
        reference = REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


# --- commands shown on the pages ------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    where: str  # page:line
    module: str
    words: tuple[str, ...]  # what follows the module, up to the end of this command

    @property
    def subcommand(self) -> str | None:
        first = self.words[0] if self.words else ""
        return first if re.fullmatch(r"[a-z][\w-]*", first) else None

    @property
    def flags(self) -> list[str]:
        found = []
        for word in self.words:
            word = word.strip("[]()<>,'\"")
            if word == "-m" or word.endswith((".py", ".sh")):
                break  # a user program follows, with its own arguments
            if re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", word):
                found.append(word.split("=", 1)[0])
        return found


def shell_lines(page: Page) -> list[tuple[int, str]]:
    """Code-block lines (continuations joined) and inline code spans of the prose."""
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in page.code:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.lstrip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        lines.append((number, line))
    if pending is not None:
        lines.append(pending)
    for number, text in page.paragraphs:
        lines += [(number, span) for _, span in INLINE_CODE.findall(text)]
    return lines


def _words(rest: str) -> tuple[str, ...]:
    words = []
    for word in rest.split():
        if word in COMMAND_END or word.startswith(">") or word == "2>&1":
            break
        if word.endswith(";"):
            words.append(word[:-1])
            break
        words.append(word)
    return tuple(words)


def commands(page: Page) -> list[Command]:
    found = []
    for number, line in shell_lines(page):
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # a shell comment
        where = f"{page.name}:{number}"
        words = [w for w in line.split() if w != "sudo"]
        while words and ENV_ASSIGNMENT.match(words[0]):
            words.pop(0)
        tool = words[0].rsplit("/", 1)[-1] if words else ""
        if tool == "torchrun":  # torchrun's own flags come before -m; the module's after it
            match = TORCHRUN_M.search(line)
            if match:
                found.append(Command(where, match.group(1).rstrip(";"), _words(match.group(2))))
            continue
        rest = line
        while (match := PYTHON_M.search(rest)) is not None:  # also `srun ... python -m ddp.train ...`
            module = match.group(1).rstrip(".")
            found.append(Command(where, module, _words(match.group(2))))
            rest = match.group(2)
    return found


def module_exists(name: str) -> bool:
    """``importlib.util.find_spec`` level by level, without running the packages' ``__init__``
    (``torch.distributed...`` would import torch into the test process)."""
    head, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(head)
    except (ImportError, ValueError):
        return False
    for depth in range(1, len(rest) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(".".join([head, *rest[:depth]]), spec.submodule_search_locations)
    return spec is not None


# --- --help, once per module (and subcommand), in parallel --------------------------------------

def _run_help(argv: tuple[str, ...]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-m", *argv, "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return done.returncode, done.stdout + done.stderr


def _run_all(argvs: set[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[int, str]]:
    ordered = sorted(argvs)
    with ThreadPoolExecutor(max_workers=max(1, len(ordered))) as pool:
        return dict(zip(ordered, pool.map(_run_help, ordered)))


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.fixture(scope="module")
def all_commands() -> list[Command]:
    return [command for path in PAGES for command in commands(read_page(path))]


@pytest.fixture(scope="module")
def helps(all_commands: list[Command]) -> dict[tuple[str, ...], tuple[int, str]]:
    """--help of every module with a flag shown; a subcommand's --help when its flags are not in
    the module's own (``python -m launch node --help``)."""
    with_flags = [c for c in all_commands if c.flags]
    found = _run_all({(c.module,) for c in with_flags})
    wanted = set()
    for c in with_flags:
        code, text = found[(c.module,)]
        sub = c.subcommand
        choices = {name for group in CHOICES.findall(text) for name in group.split(",")}
        if sub in choices and not all(_has_flag(text, flag) for flag in c.flags):
            wanted.add((c.module, sub))
    found.update(_run_all(wanted))
    return found


# --- the tests ------------------------------------------------------------------------------

PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]


def test_github_slugs():
    assert github_slug("Ranks inside Slurm (`SlurmEnv`)") == "ranks-inside-slurm-slurmenv"
    assert github_slug("The test cluster (`python -m slurm.testbed`)") == "the-test-cluster-python--m-slurmtestbed"
    assert github_slug("In Python: `ddp.fit`") == "in-python-ddpfit"
    assert github_slug("Cluster environments (`ddp/cluster/environment.py`)") == "cluster-environments-ddpclusterenvironmentpy"
    assert github_slug("`SLURM_NTASKS` and [links](x.md)") == "slurm_ntasks-and-links"
    page = Page(ROOT / "x.md", prose=[(1, "## Notes"), (2, "## Notes"), (3, "### Notes")])
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_links_resolve(path: Path):
    page = read_page(path)
    broken = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        goal = (path.parent / file_part).resolve() if file_part else path
        if not goal.exists():
            broken.append(f"{page.name}:{number}: {target}: no such file {goal.relative_to(ROOT) if goal.is_relative_to(ROOT) else goal}")
            continue
        if anchor and goal.suffix == ".md" and anchor not in anchors(read_page(goal)):
            broken.append(f"{page.name}:{number}: {target}: no heading '#{anchor}' in {goal.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_modules_import(path: Path):
    missing = []
    for command in commands(read_page(path)):
        if not module_exists(command.module):
            missing.append(f"{command.where}: python -m {command.module}: no such module")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_flags_are_in_help(path: Path, helps: dict[tuple[str, ...], tuple[int, str]]):
    wrong = []
    for command in commands(read_page(path)):
        if not command.flags:
            continue
        code, text = helps[(command.module,)]
        if code != 0:
            wrong.append(f"{command.where}: python -m {command.module} --help failed ({code}): {text[-500:]}")
            continue
        sub = helps.get((command.module, command.subcommand)) if command.subcommand else None
        if sub is not None:
            text += "\n" + sub[1]
        shown = f"python -m {command.module}" + (f" {command.subcommand}" if sub is not None else "")
        wrong += [f"{command.where}: {flag} is not in '{shown} --help'" for flag in command.flags
                  if not _has_flag(text, flag)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", [p for p in PAGES if p.parent.name == "docs"], ids=lambda p: p.name)
def test_docs_pages_start_with_commands(path: Path):
    """A page opens with what the user types: its title, then a code block."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# ") and FENCE.match(lines[1]), f"{path.name}: put the commands right after the title"


def test_the_checks_see_commands(all_commands: list[Command]):
    """Guard against a parser that silently finds nothing to check."""
    modules = {c.module for c in all_commands}
    assert {"ddp.train", "launch", "slurm.submit", "ddp.probe"} <= modules
    flags = {flag for c in all_commands for flag in c.flags}
    assert {"--recipe", "--nnodes", "--master-addr", "--gpus-per-node"} <= flags
