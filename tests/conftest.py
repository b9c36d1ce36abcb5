"""Shared test fixtures.

Tests run on the CPU with tiny sizes. Files under ../shared (parity fixture, real data samples)
are read in place and never copied into the repository; tests that need them skip with a reason
when the folder is absent, as it is in a user's clone.
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # keep TensorFlow (via clu) off any GPU
# Tests compile many small graphs once each: XLA's cheaper CPU code generation cuts compile time
# 2-3x and does not change results beyond float rounding.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The ../shared folder beside the checkout; skips the test when it is absent."""
  if not SHARED_DIR.is_dir():
    pytest.skip(f"{SHARED_DIR} is absent (only developer checkouts and CI have ../shared)")
  return SHARED_DIR


@pytest.fixture(scope="session")
def realdata_dir(shared_dir) -> pathlib.Path:
  path = shared_dir / "realdata"
  if not path.is_dir():
    pytest.skip(f"{path} is absent: real-data samples are not available here")
  return path
