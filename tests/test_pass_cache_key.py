"""The pass's cache key covers every tpfuse module the passes import (docs/passes.md, "Caching").

The barrier-elision pass decides graphs on protocol facts kept beside the kernels
(``kernels/barrier/``, ``kernels/flag/``).  A changed fact must change
``TpfusePass.uuid()``, or Inductor's FX graph cache would serve a graph decided under
the old fact.  Each uuid here is computed in a fresh process on a copy of the package
(the hash is computed once per process, as in real use).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import tpfuse
from tpfuse.passes.manager import pass_source_files

PACKAGE = os.path.dirname(os.path.abspath(tpfuse.__file__))

_UUID_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import tpfuse
    from tpfuse.passes import TpfusePass
    from tpfuse.passes.manager import PassConfig

    # the copy, not the checkout, must be what was imported
    assert os.path.dirname(os.path.dirname(os.path.abspath(tpfuse.__file__))) == sys.argv[1], tpfuse.__file__
    print(TpfusePass(PassConfig()).uuid())
    """
)


def _run(script: str, root, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPFUSE_")}
    env["PYTHONPATH"] = str(root)
    out = subprocess.run([sys.executable, "-c", script, str(root), *args],
                         env=env, capture_output=True, text=True, timeout=300, cwd=str(root))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _copy_package(root, source=PACKAGE) -> None:
    shutil.copytree(source, root / "tpfuse", ignore=shutil.ignore_patterns("__pycache__"))


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer has {old!r}: pick another fact for this test"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(an unedited copy of the package, its uuid).  The tests edit copies of this copy, so
    that nothing but their edit differs from the baseline."""
    root = tmp_path_factory.mktemp("pristine")
    _copy_package(root)
    return root / "tpfuse", _run(_UUID_SCRIPT, root)


@pytest.mark.parametrize("module, old, new", [
    ("kernels/barrier/__init__.py", "READS_END_IN_KERNEL = True", "READS_END_IN_KERNEL = False"),
    ("kernels/flag/__init__.py", 'FENCE = "{gather} (flag protocol:', 'FENCE = "{gather} (flag:'),
])
def test_uuid_changes_with_a_protocol_fact_the_passes_import(tmp_path, pristine, module, old, new):
    source, baseline = pristine
    _copy_package(tmp_path, source)
    assert _run(_UUID_SCRIPT, tmp_path) == baseline  # where the package lives is not part of the key
    _edit(tmp_path / "tpfuse" / module, old, new)
    assert _run(_UUID_SCRIPT, tmp_path) != baseline


def test_uuid_ignores_a_module_the_passes_do_not_import(tmp_path, pristine):
    """The control: ``demo.py`` is no import of the passes, so editing it keeps the key (and the cache)."""
    source, baseline = pristine
    assert not any(p.name == "demo.py" for p in pass_source_files())
    _copy_package(tmp_path, source)
    _edit(tmp_path / "tpfuse" / "cli" / "demo.py", '"""', '"""Edited. ')
    assert _run(_UUID_SCRIPT, tmp_path) == baseline


_IMPORTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import torch._inductor.config as inductor_config
    import tpfuse
    from tpfuse.passes.manager import pass_source_files

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    tpfuse.enable()

    def f(x, w):
        return funcol.all_gather_tensor(x @ w.t(), gather_dim=-1, group=dist.group.WORLD)

    with inductor_config.patch(fx_graph_cache=False):
        torch.compile(f, fullgraph=True)(torch.randn(4, 16), torch.randn(8, 16))
    assert tpfuse.report(all=True).matches, "the passes did not rewrite the gather"
    loaded = {os.path.realpath(m.__file__) for name, m in sys.modules.items()
              if name.split(".")[0] == "tpfuse" and getattr(m, "__file__", None)}
    print(json.dumps(sorted(loaded - {os.path.realpath(p) for p in pass_source_files()})))
    """
)


def test_source_walk_covers_every_module_a_compile_loads(tmp_path):
    """What the walk over import statements finds must include every tpfuse module that a
    compile with the passes actually loaded (an import the walk cannot see, e.g. through
    ``importlib``, fails here)."""
    _copy_package(tmp_path)
    assert json.loads(_run(_IMPORTED_SCRIPT, tmp_path)) == []
