"""The command line as a new user meets it: ``python -m tpfuse demo`` and ``explain``."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    proc = subprocess.run(
        [sys.executable, "-m", "tpfuse", *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_demo_runs_and_checks():
    code, out, err = _run("demo")
    assert code == 0, out + err
    assert "2 gloo ranks on cpu" in out
    assert out.rstrip().endswith("OK"), out
    assert " NO" not in out


def test_explain_prints_report_and_writes_dumps(tmp_path):
    dumps = tmp_path / "dumps"
    code, out, err = _run("explain", "examples/tp_lm_head.py:decode_step", "--dump-dir", str(dumps))
    assert code == 0, out + err
    assert "1 gather(s) rewritten, 0 near-miss(es)" in out
    assert "split_cat" in out and "mm(" in out  # the pattern and its column-linear producer
    files = sorted(p.name for p in dumps.iterdir())
    assert [f[:5] for f in files] == ["rank0", "rank1"], files
    text = (dumps / files[0]).read_text()
    before, after = text.split("# ===== after tpfuse =====")
    assert "all_gather_into_tensor" in before and "tpfuse.all_gather_hidden" in after


def test_explain_shows_the_opt_in_rewrites(tmp_path):
    code, out, err = _run("explain", "examples/tp_lm_head.py:decode_step", "--dump-dir", str(tmp_path),
                          "--fuse-linear", "--zero-copy")
    assert code == 0, out + err
    # the example is fp32: the fused kernel takes bf16/fp16, and the report says so
    assert "not fused [unsupported]: dtype float32" in out, out
    assert "zero-copy" in out, out


def test_explain_rejects_bad_entry():
    code, out, err = _run("explain", "examples/tp_lm_head.py:no_such_function")
    assert code != 0
    assert "has no attribute 'no_such_function'" in err


def test_bench_without_gpus_says_why():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine this would run the benchmarks")
    code, out, err = _run("bench")
    assert code == 2
    assert "needs 4 CUDA GPUs, found 0" in err
