"""CPU smoke run of benchmarks/bench_e2e_elimination.py: 2 gloo ranks, HF's tiny Llama, one layer.

The benchmark's own checks are what is asserted here, read back from its JSON: the ``elim``
variant eliminated the LM head's gather (``tpfuse.report()`` counts it), ``keep`` did not, and
both give ``off``'s tokens, log-probs, training loss and LM-head gradient norm (docs/passes.md,
"Gather elimination" and "Training").  HF's own training forward returns its logits: there
``elim`` keeps the gather and splits the loss, and says so; the EAGLE3-style draft head
(softmax, top-8) agrees with ``off``, whatever it eliminates."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_e2e_elimination.py")

WORKLOADS = ("greedy", "logprobs", "train_loss", "train_loss_only", "eagle_draft")
ELIMINATING = ("greedy", "logprobs", "train_loss_only")

# transformers' tp_plan loading needs accelerate as well
MISSING = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    if MISSING:
        pytest.skip(f"HF's TP plan needs {' and '.join(MISSING)} (pip install transformers accelerate)")
    out = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           "--device", "cpu", "--tiny", "--layers", "1", "--workloads", ",".join(WORKLOADS), "--batches", "2",
           "--draft-tokens", "1", "--seq", "32", "--train-seq", "32", "--rounds", "2", "--calls", "1",
           "--time-limit-s", "0", "--out", str(out)]
    # A CPU smoke test on gloo ranks: on a host with a GPU, transformers would pick NCCL for its device mesh and
    # put both ranks on GPU 0, so the GPUs are hidden from the children.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "e2e_elimination_w2.json") as f:
        return json.load(f)


def rows(payload, workload):
    (piece,) = [p for p in payload["pieces"] if p["workload"] == workload]
    return piece["rows"]


@pytest.mark.parametrize("workload", ELIMINATING)
def test_elim_eliminates_and_agrees_with_off(payload, workload):
    r = rows(payload, workload)
    assert r["elim"]["eliminated"] > 0, r["elim"]["kept_because"]
    assert r["elim"]["disagreement"] is None
    assert r["keep"]["disagreement"] is None


def test_hf_training_forward_keeps_the_gather_and_splits_the_loss(payload):
    """The control: HF's forward returns the logits, so the gather stays; the loss is still split."""
    r = rows(payload, "train_loss")
    assert r["elim"]["eliminated"] == 0 and r["elim"]["disagreement"] is None
    assert [k.split("; ")[-1] for k in r["elim"]["kept_because"]] == \
        ["the gather stays before autograd for its other use, the graph output"]


def test_training_steps_report_loss_and_gradient(payload):
    for workload in ("train_loss", "train_loss_only"):
        r = rows(payload, workload)
        assert r["off"]["value"] > 0 and r["off"]["grad_norm"] > 0
        assert r["elim"]["disagreement"] is None


def test_eagle_draft_agrees_with_off(payload):
    r = rows(payload, "eagle_draft")
    assert r["keep"]["rewritten"] == 1 and r["keep"]["disagreement"] is None
    assert r["elim"]["disagreement"] is None


@pytest.mark.parametrize("workload", ["greedy", "logprobs"])
def test_variants_are_isolated(payload, workload):
    """A negative control of the count: keep rewrote the gather but eliminated none, off touched none."""
    r = rows(payload, workload)
    assert r["keep"]["rewritten"] == 1 and r["keep"]["eliminated"] == 0
    assert r["off"]["rewritten"] == 0 and r["off"]["eliminated"] == 0


def test_every_round_timed_with_a_ratio(payload):
    assert {p["workload"] for p in payload["pieces"]} == set(WORKLOADS)
    for piece in payload["pieces"]:
        for v, row in piece["rows"].items():
            assert len(row["ms"]) == 2, (piece["workload"], v)
            median, lo, hi = row["ratio"]
            assert lo <= median <= hi
    assert payload["failures"] == []
