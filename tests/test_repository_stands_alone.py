"""The code and docs stand alone: nothing cites a file outside the repository or an issue number.

A reader of tpfuse has the repository and nothing else, so a fact that a comment or a
page leans on has to be written in ``docs/`` and cited there (the contract is
``docs/contract.md``).  This test fails on any ``.py`` or ``.md`` file under the
project's own folders that cites the planning notes (their section signs or file name),
the folder beside the checkout, an issue by number, an issue or pull request of another
repository (``owner/repo#N``) or an issue tracker's address (the patterns below).

Nor do they speak of the machinery the project was built and measured with: work sessions
and the machines lent to them (``MACHINERY``).  A measurement names its hardware, date and
result file instead.  Files written before that rule keep a counted allowance
(``MACHINERY_ALLOWED``) that may only go down.
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
    # owner/repo#N; a file's anchor (``contract.md#6-order``) is no citation
    (re.compile(r"(?<![\w./-])[A-Za-z0-9][\w.-]*/[\w.-]+(?<!\.md)(?<!\.py)#\d+(?![\w-])"),
     "an issue or pull request of another repository; state the fact it shows"),
    (re.compile(r"https?://\S*/(issues|pull|pulls|merge_requests|discussions)/\d+", re.IGNORECASE),
     "an issue tracker's page; state the fact it shows"),
]

#: words about how the work was done rather than what the code does; a POSIX process session
#: (``start_new_session``, "a session of its own") is the code's own business and is not matched
MACHINERY = re.compile(
    r"(?<!new )(?<!process )\bsessions?\b(?!\s+(of its own|leader|id)\b)"
    r"|\blent\b|\blend(s|ing)?\b|\bleased?\b|\bleases\b",
    re.IGNORECASE)

#: Files allowed to speak of the machinery, and how many of their lines may (a run is named by its date,
#: hardware and result file instead).
MACHINERY_ALLOWED: dict[str, int] = {}  # every earlier file has been reworded


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


def find_machinery_words(text):
    """``(line number, line)`` for every line of ``text`` that speaks of work sessions or lent machines."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if MACHINERY.search(line)]


def test_the_scan_sees_the_project():
    files = _files()
    # a scan of nothing passes trivially: make sure it reads the code, the docs and the tests
    for expected in ("tpfuse/__init__.py", "docs/contract.md", "README.md", "tests/conftest.py"):
        assert expected in files, f"{expected} is not scanned; scanned {len(files)} files"


def test_the_patterns_catch_each_kind_of_citation():
    # The examples are assembled here, so that this file holds no citation of its own.
    notes, shared, issue, hash_ = "CON" + "TEXT", "../" + "shared", "issue", "#"
    tracker = "https://github.com/pytorch/pytorch/"
    for line in (f"see {notes} §2.3", f"({notes.lower()} § 4)", f"as {notes}.md says", f"in {shared}/notes",
                 f"the target ({issue} 6)", f"{issue.title()} 3 item 6", f"{issue} #18",
                 f"hung (pytorch/pytorch{hash_}115388).", f"see vllm-project/vllm{hash_}1234",
                 f"NVIDIA/TransformerEngine{hash_}7,",
                 f"{tracker}issues/115388", f"({tracker}pull/12)"):
        assert find_outside_citations(line), line
    for line in ("docs/contract.md §2", "CompileContext", "the stream waits at issue, and", "issues 16-byte stores",
                 f"docs/contract.md{hash_}6", f"[order](contract.md{hash_}6-program-order)", f"W/2 {hash_}1",
                 f"x[:, 1:]{hash_}2",
                 "https://github.com/pytorch/pytorch", "a/b#cafe"):
        assert not find_outside_citations(line), line


def test_the_pattern_catches_words_about_the_machinery():
    # The examples are assembled here, so that this file holds none of the words itself.
    lent, lease, session = "le" + "nt", "le" + "ase", "ses" + "sion"
    for line in (f"W=4 was not {lent} this {session}", f"the machines {lent} were H200",
                 f"{lease.title()} 2 (runs 3, 4)", f"on two {lease}d machines", f"what the {session}s changed", f"a fresh {lease}", "le" + "nds a GPU"):
        assert find_machinery_words(line), line
    for line in ("start_new_session=True", "# a session of its own: the backstop can kill the group",
                 "a new session", "the release notes", "please", "silent", "lenient", "leaseholder"):
        assert not find_machinery_words(line), line


def test_no_file_cites_anything_outside_the_repository():
    bad = []
    for rel in _files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            for number, line, why in find_outside_citations(f.read()):
                bad.append(f"{rel}:{number}: {line}  <- cites {why}")
    assert not bad, ("cite a docs/ section that states the fact instead (write it there if it is missing):\n"
                     + "\n".join(bad))


def test_no_new_words_about_the_machinery():
    over = []
    for rel in _files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            hits = find_machinery_words(f.read())
        if len(hits) > MACHINERY_ALLOWED.get(rel, 0):
            over.append(f"{rel}: {len(hits)} lines, {MACHINERY_ALLOWED.get(rel, 0)} allowed:\n"
                        + "\n".join(f"  {n}: {line}" for n, line in hits))
    assert not over, ("speak of the hardware, the date and the result file, not of the sessions or lent machines "
                      "a run happened on:\n" + "\n".join(over))


def test_the_machinery_allowance_names_files_that_exist():
    # a renamed or deleted file would leave its allowance behind for a new file of that name
    files = set(_files())
    assert not [rel for rel in MACHINERY_ALLOWED if rel not in files]


# --------------------------------------------------------------------------- the docs reach every page

#: a markdown link or image: ``[text](target)``
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _docs_pages():
    return sorted(name for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))


def _linked(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return LINK.findall(f.read())


def test_readme_and_the_docs_index_list_every_docs_page():
    pages = _docs_pages()
    assert "index.md" in pages and "benchmarks.md" in pages  # a listing of nothing passes trivially
    in_readme = {t.split("#")[0] for t in _linked("README.md")}
    in_index = {t.split("#")[0] for t in _linked("docs/index.md")}
    assert not [p for p in pages if f"docs/{p}" not in in_readme], "README.md's Docs list lacks these docs/ pages"
    assert not [p for p in pages if p != "index.md" and p not in in_index], "docs/index.md lacks these pages"


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for rel in ["README.md", "benchmarks/NOTES.md"] + [f"docs/{p}" for p in _docs_pages()]:
        for target in _linked(rel):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):  # an anchor in the same page, or a URL
                continue
            if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path))):
                bad.append(f"{rel}: ({target})")
    assert not bad, "links to files that do not exist (figures included):\n" + "\n".join(bad)


def test_the_link_check_catches_a_missing_file():
    assert LINK.findall("see ![a plot](img/none.png) and [x](api.md#y)") == ["img/none.png", "api.md#y"]
