"""The code and docs stand alone: nothing cites a file outside the repository or an issue number.

A reader of tpfuse has the repository and nothing else, so a fact that a comment or a
page leans on has to be written in ``docs/`` and cited there (the contract is
``docs/contract.md``).  This test fails on any ``.py`` or ``.md`` file under the
project's own folders that cites the planning notes (their section signs or file name),
the folder beside the checkout or an issue by number (the patterns below).
"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: what the project ships and documents; CI's own cache (``.ci/cache``) is not part of it
SCOPE = ("tpfuse", "docs", "README.md", "examples", "tests", "benchmarks")
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT)

#: each with the reason a reader could not follow it
FORBIDDEN = [
    (re.compile(r"CONTEXT\s*§", re.IGNORECASE), "a section of planning notes that are not in the repository"),
    (re.compile(r"CONTEXT\.md", re.IGNORECASE), "planning notes that are not in the repository"),
    (re.compile(r"\.\./shared"), "a folder outside the repository"),
    (re.compile(r"\bissue\s*#?\s*\d+", re.IGNORECASE), "an issue number, which a reader cannot look up"),
]


def _files():
    """The repository's ``.py``/``.md`` files in scope: tracked ones plus new ones git does not ignore."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCOPE],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): walk the folders
        out = []
        for top in SCOPE:
            path = os.path.join(ROOT, top)
            if os.path.isfile(path):
                out.append(top)
            for base, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                out += [os.path.relpath(os.path.join(base, n), ROOT) for n in names]
    return sorted(f for f in set(out)
                  if f.endswith((".py", ".md")) and f != THIS_FILE and os.path.isfile(os.path.join(ROOT, f)))


def find_outside_citations(text):
    """``(line number, line, why)`` for every line of ``text`` that cites something a reader does not have."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in FORBIDDEN:
            if pattern.search(line):
                hits.append((number, line.strip(), why))
    return hits


def test_the_scan_sees_the_project():
    files = _files()
    # a scan of nothing passes trivially: make sure it reads the code, the docs and the tests
    for expected in ("tpfuse/__init__.py", "docs/contract.md", "README.md", "tests/conftest.py"):
        assert expected in files, f"{expected} is not scanned; scanned {len(files)} files"


def test_the_patterns_catch_each_kind_of_citation():
    # The examples are assembled here, so that this file holds no citation of its own.
    notes, shared, issue = "CON" + "TEXT", "../" + "shared", "issue"
    for line in (f"see {notes} §2.3", f"({notes.lower()} § 4)", f"as {notes}.md says", f"in {shared}/notes",
                 f"the target ({issue} 6)", f"{issue.title()} 3 item 6", f"{issue} #18"):
        assert find_outside_citations(line), line
    for line in ("docs/contract.md §2", "CompileContext", "the stream waits at issue, and", "issues 16-byte stores"):
        assert not find_outside_citations(line), line


def test_no_file_cites_anything_outside_the_repository():
    bad = []
    for rel in _files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            for number, line, why in find_outside_citations(f.read()):
                bad.append(f"{rel}:{number}: {line}  <- cites {why}")
    assert not bad, ("cite a docs/ section that states the fact instead (write it there if it is missing):\n"
                     + "\n".join(bad))
