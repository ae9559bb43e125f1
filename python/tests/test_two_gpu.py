"""The two-GPU example (tensor parallel and decode context parallel under torchrun, NCCL) as a
test: runs `torchrun --nproc-per-node 2 examples/two_gpu.py` when two GPUs are visible."""

import os
import subprocess
import sys

import pytest


def test_two_gpu_example_under_torchrun(torch_cuda):
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        if os.environ.get("ETAP_REQUIRE_TWO_GPUS") == "1":
            pytest.fail("ETAP_REQUIRE_TWO_GPUS=1 but fewer than two CUDA devices are visible")
        pytest.skip("the two-GPU example needs two CUDA devices")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "two_gpu.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", example],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(r.stdout)
    print(r.stderr[-4000:], file=sys.stderr)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    passes = [line for line in r.stdout.splitlines() if ": PASS" in line]
    assert len(passes) == 8 and "FAIL" not in r.stdout
