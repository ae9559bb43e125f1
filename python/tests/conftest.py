import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # fake.py


def _require_gpu():
    return os.environ.get("ETAP_REQUIRE_GPU") == "1"


# ETAP_DRY_RUN=1: the GPU tests' code on the CPU, the reference in place of the kernels (dry_run.py).
_DRY_RUN = os.environ.get("ETAP_DRY_RUN") == "1"
if _DRY_RUN:
    if _require_gpu():
        raise RuntimeError("ETAP_DRY_RUN=1 and ETAP_REQUIRE_GPU=1 together: a dry run uses no GPU")
    try:
        import dry_run
    except ImportError as e:
        raise RuntimeError(f"ETAP_DRY_RUN=1 needs torch and the installed etap package: {e}") from e

    dry_run.install()


@pytest.fixture(scope="session")
def torch_cuda():
    """torch with a Hopper GPU: skips (printing why) where there is none, fails instead when
    ETAP_REQUIRE_GPU=1 (the GPU run must not pass by skipping)."""
    try:
        import torch
    except ImportError:
        if _require_gpu():
            pytest.fail("ETAP_REQUIRE_GPU=1 but torch is not importable")
        pytest.skip("torch is not installed (GPU tests need torch and a CUDA GPU)")
    if _DRY_RUN:
        return torch
    if not torch.cuda.is_available():
        if _require_gpu():
            pytest.fail("ETAP_REQUIRE_GPU=1 but torch sees no CUDA device")
        pytest.skip("no CUDA device")
    major, _ = torch.cuda.get_device_capability(0)
    if major != 9:
        msg = f"{torch.cuda.get_device_name(0)} is not Hopper (sm_90); etap's kernels need sm_90a"
        if _require_gpu():
            pytest.fail(msg)
        pytest.skip(msg)
    torch.cuda.set_device(0)
    return torch


@pytest.fixture(scope="session")
def torch_any():
    """torch, on any device (for the float64 reference's own tests, which run on the CPU): skips
    without torch, fails instead when ETAP_REQUIRE_GPU=1."""
    try:
        import torch
    except ImportError:
        if _require_gpu():
            pytest.fail("ETAP_REQUIRE_GPU=1 but torch is not importable")
        pytest.skip("torch is not installed (the reference's tests need torch)")
    return torch
