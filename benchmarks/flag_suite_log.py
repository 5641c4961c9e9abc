"""Run the flag protocol's multi-GPU suite and write the log that the evidence table accepts.

    python benchmarks/flag_suite_log.py --out benchmarks/results/flag_suite_h200.log

Runs all of ``tests/gpu/test_flag_gather.py`` (W=2 and W=4; a W the host has too few GPUs
for is skipped and shows nothing for that W) with ``-v -rA``, so every test's outcome is
listed by name, after a header naming the GPU model, the GPU count and the stress length.
Committing the log and naming it as ``suite_log`` in ``tpfuse/compile_ops/flag/evidence.py``
lets ``auto`` take the flag protocol on that GPU model at each W it shows passing
(docs/flag_protocol.md, "Choosing it: on evidence"); ``derive_crossover.py --check``
verifies the claim.  Exits with pytest's status.
"""

import os

# Never NVLink multicast on the shared hosts (docs/safety.md, "Multicast"); the ranks inherit these.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from derive_crossover import ROOT, STRESS_CALLS, SUITE_FILE, suite_header  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the log to write, e.g. benchmarks/results/flag_suite_h200.log")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flag_suite_log.py: no CUDA device; the suite needs at least 2 GPUs")
    # the stress test reads the same variable with the same default
    iters = int(os.environ.get("TPFUSE_STRESS_ITERS", str(STRESS_CALLS)))
    header = suite_header(torch.cuda.get_device_name(0), torch.cuda.device_count(), iters)
    command = [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", SUITE_FILE]
    with open(args.out, "w", encoding="utf-8") as log:
        log.write(header + "\n" + "$ " + " ".join(command[1:]) + "\n")
        log.flush()
        print(header, flush=True)
        run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in run.stdout:
            sys.stdout.write(line)
            log.write(line)
        return run.wait()


if __name__ == "__main__":
    sys.exit(main())
