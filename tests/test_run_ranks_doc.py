"""docs/api.md, "Running your own function on ranks": the documented script, run as it stands, prints
what the page says it prints."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Running your own function on ranks (`run_ranks`)"


def documented_section() -> str:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else len(text)]


def test_the_documented_script_prints_what_the_page_says(tmp_path):
    section = documented_section()
    (script,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (printed,) = re.findall(r"`python my_gather\.py` prints `(.*?)`", section)
    path = tmp_path / "my_gather.py"
    path.write_text(script, encoding="utf-8")
    # tpfuse importable from the script's folder whether installed (CI) or run from the checkout (PYTHONPATH=.)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == printed
    # the gather is real: rank 1's slab is ones, so a result of one rank's slab alone would differ
    assert printed.count("1.0") == 6
