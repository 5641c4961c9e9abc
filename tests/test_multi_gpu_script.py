"""benchmarks/multi_gpu.sh on the CPU: its dry run for W=2 and W=4, and its step runner on harmless commands.

Nobody can run the script's GPU steps here, so the commands it would run are checked as printed
(the dry run prints exactly the argv it executes): every step has the no-multicast environment of
docs/safety.md ("Multicast"), ``TPFUSE_ENABLE_MULTIMEM=0`` and a time limit; each group's limits
fit a 10-minute call; every script and test file named exists; every file of tests/gpu is run;
the ``-k`` selection keeps exactly the tests written for W.  ``problems`` is the checker; the
negative controls feed it doctored dry runs and require it to object.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "multi_gpu.sh")
SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
BUDGET_S, GRACE_S = 570, 5
GROUPS = ("correctness", "flag", "stress", "elimination", "perf", "e2e", "e2e_elimination", "tune")
#: every workload of benchmarks/bench_e2e_elimination.py
E2E_WORKLOADS = {"greedy", "logprobs", "train_loss", "train_loss_only", "eagle_draft"}


def _gpu_file_part() -> str:
    """The GPU part of the suite log's name on this host: the first GPU's model where nvidia-smi lists one
    (the script names the log after the card it ran on), else the GPU hosts' H200."""
    driver = _driver()
    model = driver.gpu_model()
    return driver.file_part(model) if model else "h200"


def _driver():
    spec = importlib.util.spec_from_file_location("multi_gpu", os.path.join(ROOT, "benchmarks", "multi_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dry_run(W: int, *extra: str) -> str:
    # a hostile caller: these must not reach any step
    env = {**os.environ, "PYTHON": sys.executable, "TPFUSE_ENABLE_MULTIMEM": "1", "TPFUSE_STRESS_ITERS": "10",
           "TPFUSE_BACKEND": "nccl", "NCCL_NVLS_ENABLE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(["bash", SCRIPT, str(W), "all", "--dry-run", *extra], capture_output=True, text=True,
                         env=env, cwd="/", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# --------------------------------------------------------------------------- parsing the dry run


@dataclass
class Command:
    env: dict[str, str]
    unset: list[str]
    limit_s: int | None
    argv: list[str]  # after the time limit


@dataclass
class DryStep:
    group: str
    name: str
    limit_s: int
    log: str
    run: Command | None = None
    probe: Command | None = None
    probe_limit_s: int = 0
    raw: list[str] = field(default_factory=list)


def parse_command(line: str) -> Command:
    words = shlex.split(line)
    assert words[0] == "env", line
    words, env, unset = words[1:], {}, []
    while words and (words[0] == "-u" or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
        if words[0] == "-u":
            unset.append(words[1])
            words = words[2:]
        else:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
    limit = None
    if words[:1] == ["timeout"] and len(words) > 3 and words[1] == f"--kill-after={GRACE_S}" and words[2].isdigit():
        limit, words = int(words[2]), words[3:]
    return Command(env, unset, limit, words)


def parse(text: str) -> list[DryStep]:
    steps = []
    for line in text.splitlines():
        head = re.match(r"^\[(\w+) \d+\] (\w+): limit (\d+) s, log (\S+)$", line)
        if head:
            steps.append(DryStep(head[1], head[2], int(head[3]), head[4]))
        elif line.startswith("  run:   "):
            steps[-1].run = parse_command(line[len("  run:   "):])
            steps[-1].raw.append(line)
        elif line.startswith("  probe: "):
            steps[-1].probe = parse_command(line[len("  probe: "):])
            steps[-1].probe_limit_s = steps[-1].probe.limit_s or 0
            steps[-1].raw.append(line)
    return steps


def repo_files(argv: list[str]) -> list[str]:
    """The repository files a command names: relative paths of scripts and tests."""
    return [a for a in argv if not os.path.isabs(a) and a.endswith(".py")]


# --------------------------------------------------------------------------- the checker


def problems(text: str, W: int) -> list[str]:
    """Everything wrong with a dry run for W; [] when it is right."""
    out = []
    if "TPFUSE_ENABLE_MULTIMEM=1" in text:
        out.append("a command enables multicast (TPFUSE_ENABLE_MULTIMEM=1)")
    steps = parse(text)
    if [s.group for s in steps if s.name == "environment"] != list(GROUPS):
        out.append(f"groups {[s.group for s in steps if s.name == 'environment']}, expected {GROUPS} each "
                   "starting with its environment step")
    for s in steps:
        where = f"{s.group}/{s.name}"
        if s.run is None:
            out.append(f"{where}: no command")
            continue
        for kind, cmd in (("run", s.run), ("probe", s.probe)):
            if cmd is None:
                continue
            for key, value in {**SAFETY, "TPFUSE_ENABLE_MULTIMEM": "0", "PYTHONPATH": "."}.items():
                if cmd.env.get(key) != value:
                    out.append(f"{where} ({kind}): {key}={cmd.env.get(key)}, expected {value}")
            tpfuse = {k for k in cmd.env if k.startswith("TPFUSE_")} - {"TPFUSE_ENABLE_MULTIMEM"}
            if tpfuse:
                out.append(f"{where} ({kind}): sets {sorted(tpfuse)}: steps run the defaults")
            if cmd.env.get("CUDA_VISIBLE_DEVICES") != ",".join(map(str, range(W))):
                out.append(f"{where} ({kind}): CUDA_VISIBLE_DEVICES={cmd.env.get('CUDA_VISIBLE_DEVICES')}")
            if cmd.limit_s is None or cmd.limit_s <= 0:
                out.append(f"{where} ({kind}): no time limit (env ... timeout --kill-after={GRACE_S} N command)")
        if s.run.limit_s is not None and s.run.limit_s != s.limit_s:
            out.append(f"{where}: runs under {s.run.limit_s} s, announced {s.limit_s} s")
        if "torch.distributed.run" in s.run.argv:
            nproc = s.run.argv[s.run.argv.index("--nproc-per-node") + 1]
            if nproc != str(W):
                out.append(f"{where}: --nproc-per-node {nproc}, expected {W}")
        optional = s.probe.argv[2] if s.probe and s.probe.argv[:2] == ["test", "-f"] else None
        for path in repo_files(s.run.argv + (s.probe.argv if s.probe else [])):
            if path != optional and not os.path.isfile(os.path.join(ROOT, path)):
                out.append(f"{where}: {path} is not in the repository")
    for group in GROUPS:
        cost = sum(s.limit_s + GRACE_S + (s.probe_limit_s + GRACE_S if s.probe else 0)
                   for s in steps if s.group == group)
        if cost > BUDGET_S:
            out.append(f"group {group}: {cost} s of limits, over the {BUDGET_S} s that a 10-minute call leaves")
    return out


# --------------------------------------------------------------------------- the dry runs


@pytest.fixture(scope="module", params=[2, 4])
def dry(request):
    return request.param, dry_run(request.param)


def test_dry_run_commands_are_safe_limited_and_name_existing_files(dry):
    W, text = dry
    assert problems(text, W) == []
    steps = parse(text)
    assert all(s.run is not None for s in steps) and len(steps) >= 15
    # the hostile caller's variables are dropped or overridden in every command
    for s in steps:
        assert "TPFUSE_STRESS_ITERS" in s.run.unset and "TPFUSE_BACKEND" in s.run.unset
    assert "NCCL_NVLS_ENABLE=1" not in text


def test_every_gpu_test_file_runs(dry):
    W, text = dry
    steps = parse(text)
    named = {p for s in steps for p in repo_files(s.run.argv)}
    flag_suite = [s for s in steps if "benchmarks/flag_suite_log.py" in s.run.argv]
    assert len(flag_suite) == 1
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from derive_crossover import SUITE_FILE

    named.add(SUITE_FILE)  # flag_suite_log.py runs it, whole
    gpu_tests = {f"tests/gpu/{f}" for f in os.listdir(os.path.join(ROOT, "tests", "gpu"))
                 if f.startswith("test_") and f.endswith(".py")}
    assert gpu_tests | {"tests/test_pass_gpu.py"} <= named, sorted(gpu_tests - named)
    # test_flag_gather.py only through the suite log, so it runs once
    assert SUITE_FILE not in {p for s in steps for p in repo_files(s.run.argv)}


def test_the_flag_evidence_and_perf_steps(dry):
    W, text = dry
    steps = {s.name: s for s in parse(text)}
    suite = steps["flag_suite_log"].run.argv
    assert suite[suite.index("--out") + 1].endswith(f"benchmarks/results/flag_suite_{_gpu_file_part()}_w{W}.log")
    verdict = steps["flag_suite_verdict"].run.argv
    assert suite[suite.index("--out") + 1] in verdict and verdict[-1] == str(W)
    assert steps["derive_crossover_check"].run.argv[-2:] == ["benchmarks/derive_crossover.py", "--check"]
    names = [s.name for s in parse(text)]
    assert names.index("flag_suite_log") < names.index("flag_suite_verdict") < names.index("derive_crossover_check")
    bench = steps["bench_gather"].run.argv
    assert bench[bench.index("--tokens") + 1] == "1,8,32,128,512"
    assert bench[bench.index("--widths") + 1] == "1024,4096,32064"
    out = bench[bench.index("--out") + 1]
    # derive_crossover reads the JSON that bench_gather.py writes: <out>/bench_w<W>_<tag>.json
    tag = bench[bench.index("--tag") + 1]
    assert steps["derive_crossover"].run.argv[-1] == os.path.join(out, f"bench_w{W}_{tag}.json")
    tune = steps["tune"].run.argv
    assert tune[tune.index("-m") + 1:tune.index("-m") + 3] == ["tpfuse", "tune"] and steps["tune"].probe is None
    assert tune[tune.index("--nproc") + 1] == str(W) and steps["tune"].group == "tune"
    # the config goes under the run's folder, beside the step's log (the tune's output)
    assert os.path.dirname(tune[tune.index("--out") + 1]) == os.path.dirname(steps["tune"].log)
    assert float(tune[tune.index("--timeout") + 1]) < steps["tune"].limit_s
    assert steps["gather_elimination"].probe.argv == ["test", "-f", "benchmarks/bench_gather_elimination.py"]
    for name in ("hf_decode", "eagle_draft"):
        argv = steps[name].run.argv
        assert "--quick" in argv
        assert int(float(argv[argv.index("--time-limit-s") + 1])) < steps[name].limit_s


def test_every_e2e_elimination_workload_is_named_and_each_invocation_writes_its_own_folder(dry):
    W, text = dry
    runs = [s for s in parse(text) if "benchmarks/bench_e2e_elimination.py" in s.run.argv]
    named = [set(s.run.argv[s.run.argv.index("--workloads") + 1].split(",")) for s in runs]
    assert set().union(*named) == E2E_WORKLOADS and sum(map(len, named)) == len(E2E_WORKLOADS), named
    outs = [s.run.argv[s.run.argv.index("--out") + 1] for s in runs]
    assert len(set(outs)) == len(runs)  # the script names its JSON by W alone: one folder each
    for s in runs:
        assert int(float(s.run.argv[s.run.argv.index("--time-limit-s") + 1])) < s.limit_s


def test_k_selection_keeps_exactly_the_tests_for_W(dry):
    W, text = dry
    selections = {}
    for s in parse(text):
        if "-k" in s.run.argv:
            k = s.run.argv[s.run.argv.index("-k") + 1]
            selections.setdefault(k, []).extend(repo_files(s.run.argv))
    assert len(selections) == 1
    (k, files), = selections.items()
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    every = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    kept = subprocess.run(collect + ["-k", k], cwd=ROOT, capture_output=True, text=True, timeout=300).stdout

    def ids(out):
        return {line.strip() for line in out.splitlines() if "::" in line}

    def params(node):
        match = re.search(r"\[(.*)\]$", node)
        return match[1].split("-") if match else []

    expected = {n for n in ids(every) if not params(n) or str(W) in params(n)}
    assert ids(kept) == expected and any(params(n) for n in expected)
    other = 6 - W  # the other world size the tests are written for
    assert not any(str(other) in params(n) for n in ids(kept))


def test_out_puts_every_file_under_the_folder(tmp_path):
    text = dry_run(2, "--out", str(tmp_path))
    steps = parse(text)
    assert problems(text, 2) == []
    assert all(s.log.startswith(str(tmp_path) + os.sep) for s in steps)
    suite = next(s for s in steps if s.name == "flag_suite_log").run.argv
    assert suite[suite.index("--out") + 1] == os.path.join(str(tmp_path), f"flag_suite_{_gpu_file_part()}_w2.log")
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_only_world_sizes_the_tests_are_written_for():
    out = subprocess.run(["bash", SCRIPT, "3", "--dry-run"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2 and "W=3" in out.stderr and "(2, 4)" in out.stderr


# --------------------------------------------------------------------------- negative controls of the checker


def in_a_command(old: str, new: str):
    """A doctor that edits the first command line (run or probe) holding ``old``."""
    def doctor(text: str) -> str:
        lines = text.split("\n")
        i = next(i for i, line in enumerate(lines) if line.startswith(("  run:", "  probe:")) and old in line)
        lines[i] = lines[i].replace(old, new, 1)
        return "\n".join(lines)
    return doctor


@pytest.mark.parametrize("doctor, complaint", [
    (in_a_command("TPFUSE_ENABLE_MULTIMEM=0", "TPFUSE_ENABLE_MULTIMEM=1"), "enables multicast"),
    (in_a_command("NCCL_NVLS_ENABLE=0 ", ""), "NCCL_NVLS_ENABLE=None"),
    (in_a_command("TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "TORCH_SYMM_MEM_DISABLE_MULTICAST=0"),
     "TORCH_SYMM_MEM_DISABLE_MULTICAST=0"),
    (in_a_command("NVSHMEM_DISABLE_NVLS=1", "NVSHMEM_DISABLE_NVLS=0"), "NVSHMEM_DISABLE_NVLS=0"),
    (in_a_command("PYTHONPATH=. ", ""), "PYTHONPATH=None"),
    (in_a_command("timeout --kill-after=5 220 ", ""), "no time limit"),
    (in_a_command("timeout --kill-after=5 10 ", ""), "(probe): no time limit"),
    (in_a_command("benchmarks/bench_hf_decode.py", "benchmarks/bench_hf_decod.py"), "not in the repository"),
    (in_a_command("--nproc-per-node 2", "--nproc-per-node 4"), "--nproc-per-node 4, expected 2"),
    (lambda t: t.replace("limit 220 s", "limit 300 s").replace("--kill-after=5 220 ", "--kill-after=5 300 "),
     "over the 570 s"),
    (in_a_command("PYTHONPATH=. ", "TPFUSE_STRESS_ITERS=10 PYTHONPATH=. "), "steps run the defaults"),
])
def test_checker_objects_to_a_doctored_dry_run(doctor, complaint):
    text = dry_run(2)
    doctored = doctor(text)
    assert doctored != text
    assert any(complaint in p for p in problems(doctored, 2)), problems(doctored, 2)


# --------------------------------------------------------------------------- the runner, on harmless commands


def test_runner_statuses_logs_and_summary(tmp_path):
    mg = _driver()
    plan = mg.Plan(2, str(tmp_path), str(tmp_path / "suite.log"), "h200", sys.executable)
    preamble = "# environment\nGPU 0: fake\n"
    cases = [
        (mg.Step("ok", ("sh", "-c", "echo hello; echo NCCL=$NCCL_NVLS_ENABLE MM=$TPFUSE_ENABLE_MULTIMEM"), 20),
         "passed"),
        (mg.Step("fails", ("sh", "-c", "exit 3"), 20), "FAILED (exit 3)"),
        # the background sleep shares the step's process group: `timeout` must end it too
        (mg.Step("hangs", ("sh", "-c", "sleep 60 & sleep 60"), 1), "TIMEOUT (1 s)"),
        (mg.Step("absent", ("sh", "-c", "echo ran"), 20, probe=("test", "-f", "no/such/file.py"), probe_timeout_s=5),
         "skipped (not built yet)"),
    ]
    outcomes = []
    for i, (step, status) in enumerate(cases, 2):
        t0 = time.monotonic()
        outcome, _ = mg.run_step(step, i, "unit", plan, preamble)
        assert outcome.status == status, outcome
        assert time.monotonic() - t0 < 5  # the timed-out step and its background child end at once
        with open(outcome.log) as f:
            log = f.read()
        assert log.startswith(preamble)
        outcomes.append(outcome)
    with open(outcomes[0].log) as f:
        log = f.read()
    assert "hello" in log and "NCCL=0 MM=0" in log and "$ env " in log and "timeout --kill-after=5 20" in log
    with open(outcomes[3].log) as f:
        assert mg.SKIPPED in f.read()
    table = mg.summary(outcomes, plan, "unit")
    assert table.splitlines()[1].split()[:4] == ["step", "status", "seconds", "log"]
    assert len(table.splitlines()) == 2 + len(cases)
    assert mg.failed(outcomes) and not mg.failed([outcomes[0], outcomes[3]])


def test_a_failed_environment_step_stops_the_group(tmp_path, monkeypatch):
    mg = _driver()
    plan = mg.Plan(2, str(tmp_path), str(tmp_path / "suite.log"), "h200", sys.executable)
    monkeypatch.setattr(mg, "environment", lambda plan: mg.Step("environment", ("sh", "-c", "exit 1"), 10))
    monkeypatch.setitem(mg.BUILDERS, "unit", lambda plan: [mg.Step("never", ("sh", "-c", "touch ran"), 10)])
    outcomes = mg.run_group("unit", plan)
    assert [o.status for o in outcomes] == ["FAILED (exit 1)", "not run (environment step failed)"]
    assert not os.path.exists(os.path.join(ROOT, "ran"))


def test_a_group_over_its_budget_is_refused(monkeypatch):
    mg = _driver()
    plan = mg.make_plan(2, None, "h200")
    monkeypatch.setitem(mg.BUILDERS, "unit", lambda plan: [mg.Step("long", ("true",), 560)])
    with pytest.raises(ValueError, match="over its 570 s budget"):
        mg.steps_of("unit", plan)
