"""The command line as a new user meets it: ``python -m tpfuse demo``, ``explain``, ``bench``, ``tune``,
and every mistyped argument answered in one line (what was wrong, what is accepted) with status 2."""

import pathlib
import subprocess
import sys

import pytest

from tpfuse.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    proc = subprocess.run(
        [sys.executable, "-m", "tpfuse", *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_demo_runs_and_checks():
    code, out, err = _run("demo", "-v")  # -v after the subcommand, as users type it
    assert code == 0, out + err
    assert "2 gloo ranks on cpu" in out
    assert out.rstrip().endswith("OK"), out
    assert " NO" not in out


def test_explain_prints_report_and_writes_dumps(tmp_path):
    dumps = tmp_path / "dumps"
    code, out, err = _run("explain", "examples/tp_lm_head.py:decode_step", "--dump-dir", str(dumps))
    assert code == 0, out + err
    # the example's logits feed only argmax: the gather is rewritten, then not gathered at all
    assert "1 gather(s) rewritten, 1 of them eliminated (not gathered at all), 0 near-miss(es)" in out
    assert "split_cat" in out and "mm(" in out  # the pattern and its column-linear producer
    files = sorted(p.name for p in dumps.iterdir())
    assert [f[:5] for f in files] == ["rank0", "rank1"], files
    text = (dumps / files[0]).read_text()
    before, after = text.split("# ===== after tpfuse =====")
    assert "all_gather_into_tensor" in before and "tpfuse.max_hidden" in after
    assert "all_gather" not in after


def test_explain_shows_the_opt_in_rewrites(tmp_path):
    # --keep-gathers: the LM head's gather stays (else it is eliminated, and nothing is left to fuse)
    code, out, err = _run("explain", "examples/tp_lm_head.py:decode_step", "--dump-dir", str(tmp_path),
                          "--fuse-linear", "--zero-copy", "--keep-gathers")
    assert code == 0, out + err
    # the example is fp32: the fused kernel takes bf16/fp16, and the report says so
    assert "not fused [unsupported]: dtype float32" in out, out
    # gloo runs the gather on CPU tensors: slots, barriers and zero-copy do not apply there,
    # so the report says which backend runs and nothing about them
    assert "| gloo" in out and "why:" not in out, out
    assert not any(word in out for word in ("zero-copy", "slot", "fence")), out


def test_explain_rejects_bad_entry_in_one_line(tmp_path):
    code, out, err = _run("explain", "examples/tp_lm_head.py:no_such_function")
    assert code == 2
    assert err.strip() == ("python -m tpfuse explain: error: 'examples/tp_lm_head.py' has no "
                           "attribute 'no_such_function'"), err
    code, out, err = _run("explain", "no_colon_here")
    assert code == 2 and err.strip().splitlines() == [
        "python -m tpfuse explain: error: expected MODULE:FUNCTION or FILE.py:FUNCTION, got 'no_colon_here'"]
    # with -v (before or after the subcommand) the traceback comes too
    for args in (("-v", "explain", "no_colon_here"), ("explain", "no_colon_here", "-v")):
        code, out, err = _run(*args)
        assert code == 2 and "Traceback (most recent call last)" in err, err


def test_explain_reports_a_failing_entry_in_one_line(tmp_path):
    entry = tmp_path / "broken_model.py"
    entry.write_text("def step():\n    raise RuntimeError('the model is broken')\n")
    code, out, err = _run("explain", f"{entry}:step", "--dump-dir", str(tmp_path / "dumps"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"python -m tpfuse explain: error: {entry}:step failed: rank 0: RuntimeError: the model is "
        "broken; rank 1: RuntimeError: the model is broken (-v shows the tracebacks)"], err


def test_bench_without_gpus_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine this would run the benchmarks")
    code, out, err = _run("bench")
    assert code == 2
    assert "needs 4 CUDA GPUs, found 0" in err


#: (arguments, what the one line must say: the bad value and what is accepted)
BAD_ARGUMENTS = [
    (["demo", "--nproc", "0"], ["python -m tpfuse demo: error:", "--nproc", "'0'", ">= 2"]),
    (["demo", "--nproc", "1"], ["--nproc", "'1'", ">= 2"]),  # one rank has nothing to gather from
    (["demo", "--nproc", "two"], ["--nproc", "'two'", ">= 2"]),
    (["demo", "--timeout", "0"], ["--timeout", "'0'", "> 0"]),
    (["demo", "--timeout", "nan"], ["--timeout", "'nan'", "> 0"]),
    (["demo", "--device", "tpu"], ["--device", "'tpu'", "'cpu', 'cuda'"]),
    (["demo", "--bogus"], ["--bogus", "--nproc", "--timeout", "--device"]),
    (["--bogus"], ["python -m tpfuse: error:", "--bogus", "demo, explain, bench"]),
    ([], ["no command given", "demo, explain, bench"]),
    (["demoo"], ["'demoo'", "'demo', 'explain', 'bench'"]),
    (["explain", "m:f", "--nproc", "-1"], ["python -m tpfuse explain: error:", "'-1'", ">= 2"]),
    (["explain"], ["MODULE:FUNCTION"]),
    (["bench", "--nproc", "1"], ["python -m tpfuse bench: error:", "'1'", ">= 2"]),
]


@pytest.mark.parametrize("argv, says", BAD_ARGUMENTS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_a_bad_argument_is_one_line_naming_it(argv, says, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1, err
    for words in says:
        assert words in err, (words, err)


def test_demo_on_missing_gpus_is_one_line(capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs: the demo would run")
    code = main(["demo", "--device", "cuda", "--nproc", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "python -m tpfuse demo: error: --device cuda --nproc 2 needs 2 GPUs, found" in err
    assert "--device cpu" in err


def test_the_module_entry_names_a_bad_flag():
    # the same, through ``python -m tpfuse`` (tpfuse/__main__.py), as a user types it
    code, out, err = _run("--bogus")
    assert code == 2 and err.strip().splitlines() == [
        "python -m tpfuse: error: unrecognized argument(s) --bogus; accepted: --help, --verbose, "
        "then a command: " + ", ".join(_commands())], err


def _commands():
    return ["demo", "explain", "bench"] + (["tune"] if _has_tuner() else [])


def _has_tuner():
    return (ROOT / "tpfuse" / "tune.py").exists() or (ROOT / "tpfuse" / "cli" / "tune.py").exists()


def test_tune_is_a_command_where_the_checkout_has_the_tuner():
    import tpfuse.cli

    found = tpfuse.cli.tuner()
    assert (found is not None) == _has_tuner()
    if found is not None:
        assert found.__name__ == "main" and found.__module__ in ("tpfuse.tune", "tpfuse.cli.tune")


def test_tune_hands_every_argument_after_it_to_the_tuner(monkeypatch, capsys):
    import tpfuse.cli

    got = []
    monkeypatch.setattr(tpfuse.cli, "tuner", lambda: lambda argv: got.append(argv) or 3)
    assert main(["-v", "tune", "--gpu", "h200", "-v", "--help", "out.json"]) == 3
    assert got == [["--gpu", "h200", "-v", "--help", "out.json"]]
    # the negative control: without a tuner, ``tune`` is no command, said in one line
    monkeypatch.setattr(tpfuse.cli, "tuner", lambda: None)
    assert main(["tune", "--help"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'tune'" in err, err
