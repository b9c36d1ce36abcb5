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
# Tests compile many small graphs once each: skipping LLVM's expensive passes cuts compile time
# and does not change results. (--xla_backend_optimization_level=0 would cut more, but it
# miscompiles the train step on CPU in jaxlib 0.10.2: NaN gradients from step 2 on.)
os.environ.setdefault("XLA_FLAGS", "--xla_llvm_disable_expensive_passes=true")

import tempfile

# One persistent compilation cache per test session (shared by the xdist workers): the end-to-end
# tests build the same train and eval steps several times (train, resume, NaN run, eval).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"cmmp-jax-test-cache-{os.getppid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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
