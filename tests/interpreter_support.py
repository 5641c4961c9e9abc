"""What the interpreter scripts (``interpret_*.py``) need from the machine, and when they cannot run.

``addressed``: CPU memory for the kernels' raw-address arguments (``buf0..7``,
``pad0..7``).  Triton's interpreter types an integer argument by its value, as the
compiler does: an address below 2**31 becomes an i32, below 2**32 a u32.  The cast
to a pointer (``pick(...).to(<pointer type>)``) is a bitcast there, a NumPy ``view``
of the 4-byte value as 8 bytes, which fails ("When changing to a larger dtype, its
size must be a divisor of the total size in bytes of the last axis of the array").
Compiled, the same cast widens the value; on the GPU the addresses are 64-bit values
anyway.  A malloc'd CPU tensor can sit below 4 GiB (where the heap follows a Python
binary that is not position independent, for one), so the buffers whose addresses the
kernels take are anonymous mmaps, which Linux places high, and the address is checked.

``skip_reason``: Triton 3.6's interpreter turns a one-element array into a Python int
with ``int()`` (a loop bound computed in the kernel, ``range(0, my_tiles)``), which
NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
Triton 3.7 squeezes the array first.  No change to the kernels avoids it: their loops
run to computed bounds.

``print_report``: what a script prints, the report its command line picks.  ``interpret`` and
``triton36_report``: how the tests run those scripts, and the ahead-of-time reports
(``aot_*_report.py``) under the GPU machines' Triton 3.6, in a fresh Python whose last printed line is
the JSON they check.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def addressed(numel: int, dtype, fill=0):
    """A CPU tensor of ``numel`` elements set to ``fill``, at an address of 2**32 or more."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    # the tensor's storage holds the mapping (torch.frombuffer keeps a reference to it)
    tensor = torch.frombuffer(mmap.mmap(-1, max(1, numel * itemsize)), dtype=dtype, count=numel)
    if tensor.data_ptr() < 2**32:
        raise RuntimeError(f"mmap placed a buffer at {tensor.data_ptr():#x}, below 4 GiB: the interpreter "
                           "would type its address as a 32-bit integer")
    return tensor.fill_(fill)


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def skip_reason(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions (None: it can)."""
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version = triton_version or triton.__version__
        numpy_version = numpy_version or numpy.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter converts one-element arrays with int(), which "
                f"NumPy {numpy_version} refuses (the kernels' computed loop bounds); Triton 3.7 squeezes them "
                "first. Run with numpy<2.4 or Triton >= 3.7")
    return None


def print_report(argv: list[str], **reports) -> None:
    """Print ``{name: report()}`` as one JSON line for the report that ``--name`` in ``argv`` picks, the first
    of ``reports`` where none does (``script_result`` reads the last line)."""
    name = next((n for n in reports if f"--{n}" in argv), next(iter(reports)))
    print(json.dumps({name: reports[name]()}))


def script_result(name: str, *flags: str, env: dict, timeout: int) -> dict:
    """Run ``tests/<name>`` with ``flags`` in a fresh Python and return the JSON of its last printed line
    (the test fails with the script's stderr where it exits non-zero)."""
    done = subprocess.run([sys.executable, os.path.join(HERE, name), *flags], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def interpret(name: str, *flags: str, timeout: int = 600) -> dict:
    """``tests/<name>`` (an ``interpret_*.py`` script) in Triton's interpreter; skips the test where
    ``skip_reason`` says the installed Triton and NumPy cannot run it."""
    reason = skip_reason()
    if reason:
        import pytest

        pytest.skip(reason)
    # the script puts the repository on sys.path itself; an inherited PYTHONPATH (a Triton 3.6 target, for
    # one) would put another Triton first
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return script_result(name, *flags, env=env, timeout=timeout)


def triton36_report(name: str) -> dict:
    """``tests/<name>`` (an ``aot_*_report.py`` script) under the Triton that ``TPFUSE_TRITON36_PATH`` holds,
    without torch; skips where the variable is unset, fails where CI left it unset."""
    path = os.environ.get("TPFUSE_TRITON36_PATH")
    if not path:
        import pytest

        if os.environ.get("CI"):
            pytest.fail("CI must set TPFUSE_TRITON36_PATH (pip install --no-deps --target DIR triton==3.6.0)")
        pytest.skip("TPFUSE_TRITON36_PATH is not set")
    report = script_result(name, "--no-torch", env=dict(os.environ, PYTHONPATH=path), timeout=600)
    assert report["triton"].startswith("3.6"), report["triton"]
    assert not report["torch_imported"]
    return report
