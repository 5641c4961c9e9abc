"""Every multi-GPU check and benchmark for one world size W, in groups that each fit a 10-minute call.

    benchmarks/multi_gpu.sh W [correctness|flag|stress|elimination|perf|e2e|e2e_elimination|tune|all]
                             [--dry-run] [--out DIR]

W is 2 or 4 (the GPU tests are written for those two).  The host needs at least W GPUs; the
first W are used (``CUDA_VISIBLE_DEVICES=0,..,W-1`` unless it is set already).  Groups, in
order of value (docs/benchmarks.md, "Multi-GPU runs: one script"):

- ``correctness``: the op's multi-GPU tests at W (tests/gpu/test_push_gather.py,
  test_group_lifecycle.py, test_linear_push.py) and tests/test_pass_gpu.py, ``pytest -rA``;
- ``flag``: the whole flag-protocol suite (tests/gpu/test_flag_gather.py: correctness, the
  10,000-call stress, the negative controls) through ``benchmarks/flag_suite_log.py``, which
  writes the suite log the evidence table accepts (``flag_suite_<gpu>_w<W>.log``), whether that
  log is accepted for (GPU model, W), and ``derive_crossover.py --check``;
- ``stress``: the barrier-elision stress at W and the one-GPU emulation files of tests/gpu;
- ``elimination``: the vocab-parallel reductions over NCCL at W (tests/gpu/test_reduce_hidden_gpu.py)
  and the one-GPU tests of their Triton kernels and of the fused LM head's (test_lm_head_reduce_gpu.py);
  then the rank-consistency checks the CPU cannot reach (tests/gpu/test_trust_review_gpu.py, two ranks);
- ``perf``: the nccl_symmetric backend's multi-GPU tests at W (tests/gpu/test_nccl_symmetric.py: they
  skip, naming why, where the host cannot register NCCL symmetric windows), ``bench_gather.py`` (T in
  1,8,32,128,512 x widths 1024,4096,32064, under torchrun; its ``nccl_symmetric`` column) and the
  crossover derived from its JSON;
- ``e2e``: ``bench_gather_elimination.py`` once it exists, ``bench_hf_decode.py --quick`` and
  ``bench_eagle_draft.py --quick``;
- ``e2e_elimination``: the end-to-end HF runs of ``bench_e2e_elimination.py``, all five workloads
  named (``--workloads``) in two invocations, so that none is left out by its time limit:
  the inference ones (greedy, logprobs, eagle_draft), then training (train_loss, train_loss_only),
  each into its own folder (the script names its JSON by W alone);
- ``tune``: ``python -m tpfuse tune --nproc W`` writing the config into ``<out>/tune/`` (its log
  is the step's), then tests/gpu/test_tune_gpu.py (the one-GPU smoke and a real 2-rank tune);
- ``all``: the eight in that order (about 70 minutes: for a machine without a per-call limit).

test_flag_gather.py runs once, in ``flag``: its log is the evidence, and running it in
``correctness`` as well would cost a third of that call.

Every step runs as ``env ... timeout --kill-after=5 <limit> <command>``: the environment names
the no-multicast variables of docs/safety.md ("Multicast"), pins ``TPFUSE_ENABLE_MULTIMEM=0``
(dispatch takes the multimem kernel only when it is 1) and drops every other inherited
``TPFUSE_*`` variable, so each step runs the defaults (``TPFUSE_STRESS_ITERS`` in particular
would shorten the stress tests below what a suite log needs).  ``--dry-run`` prints exactly
those command lines and runs nothing.  ``timeout`` signals the step's whole process group, so
the ranks a test spawns die with it.

Output goes to ``benchmarks/results/multi_gpu_w<W>_<YYYYMMDD>/`` (or ``--out DIR``): one log per
step, ``<group>_<nn>_<step>.log``, each starting with ``nvidia-smi -L`` and the torch, Triton and
NCCL versions, then the command; the benchmarks' JSON and plots; ``summary_<group>.txt``/``.json``.
The flag suite log goes to ``benchmarks/results/flag_suite_<gpu>_w<W>.log``, where the evidence
table names it (``--out DIR``: into DIR, to be copied there).  A summary table (step, status,
seconds, log) is printed last; the exit status is 1 when any step failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "benchmarks/results"
WORLD_SIZES = (2, 4)

#: never NVLink multicast on the shared hosts (docs/safety.md, "Multicast")
SAFETY_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: dispatch picks the multimem kernel only when this is "1": pinned so an inherited value cannot
MULTIMEM_OFF = {"TPFUSE_ENABLE_MULTIMEM": "0"}

#: Time budget.  A call on the GPU hosts ends after 600 s; a group's steps must end by 570 s
#: (30 s for start-up, the transfers and the summary).  A step costs its limit plus the 5 s that
#: ``timeout`` waits between SIGTERM and SIGKILL, and an optional step its probe's as well.
#: The limits (seconds), from the logs in benchmarks/results (W=2 and W=4 on H200) with margin:
#:   correctness: environment 30 + push/lifecycle 220 + linear push 200 + pass_gpu 90 = 540 (+20) = 560
#:   flag:        environment 30 + flag suite 430 + suite verdict 45 + --check 45   = 550 (+20) = 570
#:                (at W=4 the suite runs its W=2 tests too: it must run whole to count as evidence)
#:   stress:      environment 30 + barrier-elision stress 300 + one-GPU files 220    = 550 (+15) = 565
#:   elimination: environment 30 + reduce_hidden 200 + one-GPU kernels 250 + trust review 60
#:                                                                                 = 540 (+20) = 560
#:                (trust review: tests/gpu/test_trust_review_gpu.py, at W=2 only; not yet timed on a GPU)
#:   perf:        environment 30 + nccl_symmetric tests 150 + bench_gather 300 + derive 30 = 510 (+20) = 530
#:                (bench_gather: 270 before its nccl_symmetric column, about a sixth more timings)
#:   e2e:         environment 30 + elimination (probe 10) 150 + HF 210 + EAGLE 120  = 520 (+25) = 545
#:   e2e_elimination: environment 30 + inference workloads 260 + training 260       = 550 (+15) = 565
#:   tune:        environment 30 + tune 300 + tests/gpu/test_tune_gpu.py 220          = 550 (+15) = 565
GROUP_BUDGET_S = 570
KILL_GRACE_S = 5
#: the benchmarks stop starting new pieces this long before their step's limit (start-up, teardown)
BENCH_MARGIN_S = 60
GROUPS = ("correctness", "flag", "stress", "elimination", "perf", "e2e", "e2e_elimination", "tune")

SKIPPED = "not built yet: skipped"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    timeout_s: int
    #: an optional step runs only when its probe exits 0; otherwise it is reported as skipped
    probe: tuple[str, ...] | None = None
    probe_timeout_s: int = 0

    def cost_s(self) -> int:
        probe = self.probe_timeout_s + KILL_GRACE_S if self.probe else 0
        return self.timeout_s + KILL_GRACE_S + probe


@dataclass(frozen=True)
class Plan:
    W: int
    run_dir: str  # repo-relative or absolute
    suite_log: str
    gpu: str  # the GPU model as a file-name part, e.g. "h200"
    python: str


# --------------------------------------------------------------------------- the steps


def pytest(*args: str, python: str) -> tuple[str, ...]:
    # serial (no xdist: the tests own the GPUs); durations to size the limits next time
    return (python, "-m", "pytest", "-v", "-rA", "--durations=0", "--durations-min=1.0",
            "-p", "no:xdist", "-p", "no:cacheprovider", *args)


def at_world_size(W: int) -> str:
    """A ``-k`` expression keeping the tests parametrized for W (``[W]``, ``[W-...]``) and the unparametrized."""
    return f"[{W}] or [{W}- or not ["


def torchrun(plan: Plan, script: str, *args: str) -> tuple[str, ...]:
    return (plan.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(plan.W),
            script, *args)


def environment(plan: Plan) -> Step:
    return Step("environment", (plan.python, "benchmarks/multi_gpu.py", "--print-environment", str(plan.W)), 30)


def correctness(plan: Plan) -> list[Step]:
    k = at_world_size(plan.W)
    py = plan.python
    return [
        Step("push_gather_and_group_lifecycle",
             pytest("-k", k, "tests/gpu/test_push_gather.py", "tests/gpu/test_group_lifecycle.py", python=py), 220),
        Step("linear_push", pytest("-k", k, "tests/gpu/test_linear_push.py", python=py), 200),
        Step("pass_gpu", pytest("-k", k, "tests/test_pass_gpu.py", python=py), 90),
    ]


def flag(plan: Plan) -> list[Step]:
    py = plan.python
    return [
        # the whole file, nothing deselected: derive_crossover accepts no less as a suite log
        Step("flag_suite_log", (py, "benchmarks/flag_suite_log.py", "--out", plan.suite_log), 430),
        Step("flag_suite_verdict",
             (py, "benchmarks/multi_gpu.py", "--suite-verdict", plan.suite_log, str(plan.W)), 45),
        Step("derive_crossover_check", (py, "benchmarks/derive_crossover.py", "--check"), 45),
    ]


def stress(plan: Plan) -> list[Step]:
    py = plan.python
    return [
        Step("barrier_elision_stress",
             pytest("-k", at_world_size(plan.W), "tests/gpu/test_barrier_elision_stress.py", python=py), 300),
        # W ranks emulated on one GPU: not parametrized by the host's W, so run whole
        Step("one_gpu_emulation",
             pytest("tests/gpu/test_flag_gather_one_gpu.py", "tests/gpu/test_barrier_push_one_gpu.py", python=py),
             220),
    ]


def elimination(plan: Plan) -> list[Step]:
    py = plan.python
    return [
        # the vocab-parallel reductions over NCCL at W (the exchange is real here)
        Step("reduce_hidden_gpu", pytest("-k", at_world_size(plan.W), "tests/gpu/test_reduce_hidden_gpu.py",
                                         python=py), 200),
        # their Triton kernels, the fused LM head's, and the ops on a one-rank group: not parametrized by W
        Step("vocab_kernels_one_gpu",
             pytest("tests/gpu/test_vocab_reduce_gpu.py", "tests/gpu/test_vocab_softmax_gpu.py",
                    "tests/gpu/test_lm_head_reduce_gpu.py", python=py), 250),
        # rank consistency the CPU tests cannot reach: two NCCL ranks, whatever W (tests/test_trust_review.py)
        Step("trust_review_gpu", pytest("tests/gpu/test_trust_review_gpu.py", python=py), 60),
    ]


def bench_json(plan: Plan) -> str:
    """Where bench_gather.py writes its JSON: ``<out>/bench_w<W>_<tag>.json``."""
    return os.path.join(plan.run_dir, f"bench_w{plan.W}_{plan.gpu}.json")


def perf(plan: Plan) -> list[Step]:
    py = plan.python
    return [
        # the backend bench_gather's nccl_symmetric column times: bit-exact first
        Step("nccl_symmetric_gpu", pytest("-k", at_world_size(plan.W), "tests/gpu/test_nccl_symmetric.py", python=py),
             150),
        Step("bench_gather",
             torchrun(plan, "benchmarks/bench_gather.py", "--tokens", "1,8,32,128,512", "--widths", "1024,4096,32064",
                      "--diagnose", "1x4096,8x1024,32x4096", "--tag", plan.gpu, "--out", plan.run_dir), 300),
        Step("derive_crossover", (py, "benchmarks/derive_crossover.py", bench_json(plan)), 30),
    ]


def e2e(plan: Plan) -> list[Step]:
    script = "benchmarks/bench_gather_elimination.py"

    def limit(timeout_s: int) -> tuple[str, ...]:
        return ("--time-limit-s", str(timeout_s - BENCH_MARGIN_S))

    return [
        # funcol / tpfuse gather + reduction / eliminated, per rank, at vocab 128256
        Step("gather_elimination", torchrun(plan, script, "--vocab", "128256", "--tokens", "1,8,128,1024,4096",
                                            "--rounds", "5", "--calls", "10", "--out", plan.run_dir), 150,
             probe=("test", "-f", script), probe_timeout_s=10),
        Step("hf_decode", torchrun(plan, "benchmarks/bench_hf_decode.py", "--quick", *limit(210), "--out",
                                   plan.run_dir), 210),
        Step("eagle_draft", torchrun(plan, "benchmarks/bench_eagle_draft.py", "--quick", *limit(120), "--out",
                                     plan.run_dir), 120),
    ]


#: bench_e2e_elimination.py's workloads, per invocation: each fits its step with its time limit
E2E_ELIMINATION_WORKLOADS = {"inference": ("greedy", "logprobs", "eagle_draft"),
                             "training": ("train_loss", "train_loss_only")}
E2E_ELIMINATION_LIMIT_S = 260
#: bench_e2e_elimination.py stops starting pieces this long before its step's limit (its teardown is short)
E2E_ELIMINATION_MARGIN_S = 30


def e2e_elimination(plan: Plan) -> list[Step]:
    """HF Llama compiled unmodified (greedy step, log-prob scoring, EAGLE draft head, training loss with and
    without the logits); off / keep / elim.  Each invocation writes e2e_elimination_w<W>.json into its folder."""
    limit = str(E2E_ELIMINATION_LIMIT_S - E2E_ELIMINATION_MARGIN_S)
    return [Step(f"e2e_elimination_{part}",
                 torchrun(plan, "benchmarks/bench_e2e_elimination.py", "--workloads", ",".join(workloads),
                          "--time-limit-s", limit, "--out", os.path.join(plan.run_dir, f"e2e_elimination_{part}")),
                 E2E_ELIMINATION_LIMIT_S)
            for part, workloads in E2E_ELIMINATION_WORKLOADS.items()]


TUNE_LIMIT_S = 300


def tune(plan: Plan) -> list[Step]:
    """The machine's tuned config (docs/tuning.md) into ``<out>/tune/``; the step's log is the tune's."""
    py = plan.python
    return [
        # its own rank timeout inside the step's limit: a hung rank is reported by tune, not only killed
        Step("tune", (py, "-m", "tpfuse", "tune", "--nproc", str(plan.W), "--out", os.path.join(plan.run_dir, "tune"),
                      "--timeout", str(TUNE_LIMIT_S - 30)), TUNE_LIMIT_S),
        # the one-GPU smoke at W=2 and 4 and a real tune on 2 ranks: not parametrized by the host's W
        Step("tune_gpu_tests", pytest("tests/gpu/test_tune_gpu.py", python=py), 220),
    ]


BUILDERS = {"correctness": correctness, "flag": flag, "stress": stress, "elimination": elimination, "perf": perf,
            "e2e": e2e, "e2e_elimination": e2e_elimination, "tune": tune}


def steps_of(group: str, plan: Plan) -> list[Step]:
    """The group's steps, the environment first; refuses a group over its budget."""
    steps = [environment(plan)] + BUILDERS[group](plan)
    total = sum(s.cost_s() for s in steps)
    if total > GROUP_BUDGET_S:
        raise ValueError(f"group {group} needs up to {total} s, over its {GROUP_BUDGET_S} s budget "
                         f"(a call ends after 600 s): shorten its limits or split it")
    return steps


# --------------------------------------------------------------------------- the environment of a step


def cuda_devices(W: int) -> str:
    """The GPUs the steps see: the caller's choice if made, else the first W."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(W)))


def step_env(W: int) -> dict[str, str]:
    return {**SAFETY_ENV, **MULTIMEM_OFF, "PYTHONPATH": ".", "CUDA_VISIBLE_DEVICES": cuda_devices(W)}


def inherited_tpfuse() -> list[str]:
    """TPFUSE_* variables of this shell that would change a step's behaviour: every step drops them."""
    return sorted(k for k in os.environ if k.startswith("TPFUSE_") and k not in MULTIMEM_OFF)


def command_line(step_argv: tuple[str, ...], timeout_s: int, W: int) -> list[str]:
    """What actually runs: the environment, the time limit, the command."""
    unset = [arg for name in inherited_tpfuse() for arg in ("-u", name)]
    assign = [f"{k}={v}" for k, v in step_env(W).items()]
    return ["env", *unset, *assign, "timeout", f"--kill-after={KILL_GRACE_S}", str(timeout_s), *step_argv]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    step: str
    status: str
    seconds: float
    log: str


def run_logged(argv: list[str], timeout_s: int, log, echo=True) -> tuple[int, float, str]:
    """Run ``argv`` from the repository root, its output into ``log`` (and stdout); (exit status, seconds, output)."""
    t0 = time.monotonic()
    # a session of its own: the backstop below can kill every process the step started
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # `timeout` ends the step; this only guards against `timeout` itself not returning
        rc = proc.wait(timeout=timeout_s + KILL_GRACE_S + 15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    # a grandchild that left the process group may hold the pipe open: do not wait for it
    reader.join(timeout=10)
    log.flush()
    return rc, time.monotonic() - t0, "".join(lines)


def status_of(rc: int, seconds: float, timeout_s: int) -> str:
    if rc == 0:
        return "passed"
    if rc in (124, 137, -9) and seconds >= timeout_s - 1:
        return f"TIMEOUT ({timeout_s} s)"
    return f"FAILED (exit {rc})"


def run_step(step: Step, index: int, group: str, plan: Plan, preamble: str) -> tuple[Outcome, str]:
    """One step with its log, which starts with ``preamble``; returns its outcome and its output."""
    path = os.path.join(plan.run_dir, f"{group}_{index:02d}_{step.name}.log")
    argv = command_line(step.argv, step.timeout_s, plan.W)
    print(f"\n=== [{group} {index}] {step.name} (limit {step.timeout_s} s) -> {path}", flush=True)
    with open(path, "w", encoding="utf-8") as log:
        log.write(preamble)
        if step.probe:
            probe = command_line(step.probe, step.probe_timeout_s, plan.W)
            log.write(f"$ {shlex.join(probe)}\n")
            rc, seconds, _ = run_logged(probe, step.probe_timeout_s, log, echo=False)
            if rc != 0:
                log.write(f"\n{SKIPPED} (the probe exited {rc})\n")
                print(SKIPPED, flush=True)
                return Outcome(f"{group}/{step.name}", "skipped (not built yet)", seconds, path), ""
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        rc, seconds, output = run_logged(argv, step.timeout_s, log)
        status = status_of(rc, seconds, step.timeout_s)
        log.write(f"\n[{step.name}: {status}, {seconds:.1f} s]\n")
    return Outcome(f"{group}/{step.name}", status, seconds, path), output


def run_group(group: str, plan: Plan) -> list[Outcome]:
    """The group's steps in order; none after a failed environment step (no GPUs, wrong count)."""
    outcomes, preamble = [], ""
    for index, step in enumerate(steps_of(group, plan), 1):
        if outcomes and outcomes[0].status != "passed":
            outcomes.append(Outcome(f"{group}/{step.name}", "not run (environment step failed)", 0.0, "-"))
            continue
        outcome, output = run_step(step, index, group, plan, preamble)
        if index == 1:  # the environment step: its output heads every later log of the group
            preamble = f"# environment (step {group}/{step.name})\n{output}\n"
        outcomes.append(outcome)
    return outcomes


def summary(outcomes: list[Outcome], plan: Plan, group: str) -> str:
    width = max([len(o.step) for o in outcomes] + [4])
    lines = [f"summary: W={plan.W}, group {group}, results in {plan.run_dir}",
             f"{'step':<{width}}  {'status':<34} {'seconds':>8}  log"]
    lines += [f"{o.step:<{width}}  {o.status:<34} {o.seconds:8.1f}  {o.log}" for o in outcomes]
    return "\n".join(lines)


def failed(outcomes: list[Outcome]) -> bool:
    return any(not (o.status == "passed" or o.status.startswith("skipped")) for o in outcomes)


# --------------------------------------------------------------------------- the plan and the dry run


def gpu_model() -> str | None:
    """The first visible GPU's name from nvidia-smi, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def file_part(name: str) -> str:
    """'NVIDIA H200' -> 'h200': the GPU model as the results' file names spell it."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"^nvidia\s+", "", name.strip().lower())).strip("_")


def make_plan(W: int, out: str | None, gpu: str) -> Plan:
    run_dir = out or os.path.join(RESULTS, f"multi_gpu_w{W}_{time.strftime('%Y%m%d')}")
    suite_dir = out or RESULTS
    return Plan(W, run_dir, os.path.join(suite_dir, f"flag_suite_{gpu}_w{W}.log"), gpu, sys.executable)


def dry_run(groups: list[str], plan: Plan, note: str) -> None:
    print(f"# multi_gpu: W={plan.W}, groups {', '.join(groups)}; results in {plan.run_dir} (dry run: nothing runs)")
    if note:
        print(f"# {note}")
    print("# every step's environment: " + " ".join(f"{k}={v}" for k, v in step_env(plan.W).items())
          + "".join(f" (drops {k})" for k in inherited_tpfuse()))
    for group in groups:
        steps = steps_of(group, plan)
        print(f"\n## group {group}: up to {sum(s.cost_s() for s in steps)} s of its {GROUP_BUDGET_S} s budget")
        for index, step in enumerate(steps, 1):
            log = os.path.join(plan.run_dir, f"{group}_{index:02d}_{step.name}.log")
            print(f"[{group} {index}] {step.name}: limit {step.timeout_s} s, log {log}")
            if step.probe:
                print(f"  probe: {shlex.join(command_line(step.probe, step.probe_timeout_s, plan.W))}")
                print(f"  (runs only if the probe exits 0; otherwise \"{SKIPPED}\")")
            print(f"  run:   {shlex.join(command_line(step.argv, step.timeout_s, plan.W))}")


# --------------------------------------------------------------------------- helpers run as steps


def print_environment(W: int) -> int:
    """The head of every log: GPUs, versions, commit, the safety variables; fails unless W GPUs are visible."""
    import importlib.metadata as metadata
    import platform

    smi = shutil.which("nvidia-smi")
    print("$ nvidia-smi -L")
    print(subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.rstrip() if smi else "no nvidia-smi")
    import torch
    import triton

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none (no CUDA)"
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "not installed"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"torch {torch.__version__} | triton {triton.__version__} | NCCL {nccl} | CUDA {torch.version.cuda} "
          f"| transformers {transformers} | Python {platform.python_version()} "
          f"| commit {git.stdout.strip() if git.returncode == 0 else 'unknown (no git)'}")
    print(" ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in
                   (*SAFETY_ENV, *MULTIMEM_OFF, "CUDA_VISIBLE_DEVICES", "PYTHONPATH")))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"visible GPUs: {n}; world size W={W}")
    if n != W:  # more would let the flag suite and unfiltered files run at another W
        print(f"W={W} needs exactly {W} visible GPUs (CUDA_VISIBLE_DEVICES), found {n}: nothing else runs")
        return 1
    return 0


def suite_verdict(log_path: str, W: int) -> int:
    """Whether the suite log stands for (this GPU model, w) for each w <= W, as derive_crossover judges it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from derive_crossover import suite_node_ids, suite_refusal

    device = torch.cuda.get_device_name(0)
    with open(os.path.join(ROOT, log_path), encoding="utf-8", errors="replace") as f:
        text = f.read()
    refused_at_W = False
    for w in (w for w in WORLD_SIZES if w <= W):
        why = suite_refusal(text, device, w, suite_node_ids(w))
        print(f"({device!r}, {w}): " + (f"not accepted: {why}" if why else
                                        f"accepted: name {log_path} (under {RESULTS}/) as suite_log in "
                                        "tpfuse/compile_ops/flag/evidence.py"))
        refused_at_W |= bool(why) and w == W
    return 1 if refused_at_W else 0


# --------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/multi_gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("W", type=int, help=f"world size: one of {', '.join(map(str, WORLD_SIZES))}")
    parser.add_argument("group", nargs="?", default="all", choices=(*GROUPS, "all"))
    parser.add_argument("--dry-run", action="store_true", help="print every command with its environment; run none")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/multi_gpu_w<W>_<date>)")
    args = parser.parse_args(argv)
    if args.W not in WORLD_SIZES:
        parser.error(f"W={args.W}: the GPU tests are written for W in {WORLD_SIZES}; give one of those")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.update(SAFETY_ENV)  # this process's own probes and helpers too
    os.environ.update(MULTIMEM_OFF)
    if argv[:1] == ["--print-environment"]:
        return print_environment(int(argv[1]))
    if argv[:1] == ["--suite-verdict"]:
        return suite_verdict(argv[1], int(argv[2]))
    args = parse(argv)
    os.chdir(ROOT)  # the steps name repo-relative paths and PYTHONPATH=.
    groups = list(GROUPS) if args.group == "all" else [args.group]
    model = gpu_model()
    note = ""
    if model is None:
        if not args.dry_run:
            print("no GPU found (nvidia-smi lists none): this script needs a host with W GPUs", file=sys.stderr)
            return 1
        model, note = "NVIDIA H200", "no GPU here: file names assume NVIDIA H200 (the GPU hosts)"
    plan = make_plan(args.W, args.out, file_part(model))
    if args.dry_run:
        dry_run(groups, plan, note)
        return 0
    os.makedirs(plan.run_dir, exist_ok=True)
    outcomes = []
    for group in groups:
        outcomes += run_group(group, plan)
    name = args.group
    table = summary(outcomes, plan, name)
    with open(os.path.join(plan.run_dir, f"summary_{name}.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(plan.run_dir, f"summary_{name}.json"), "w", encoding="utf-8") as f:
        json.dump([o.__dict__ for o in outcomes], f, indent=1)
    print("\n" + table, flush=True)
    return 1 if failed(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
