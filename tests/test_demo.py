import subprocess
import sys


def test_demo_runs_and_checks():
    proc = subprocess.run(
        [sys.executable, "-m", "tpfuse", "demo"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 gloo ranks on cpu" in proc.stdout
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    assert " NO" not in proc.stdout
