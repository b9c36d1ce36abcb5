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

import shutil
import tempfile

# One persistent compilation cache per test session, shared by the xdist workers and the
# subprocesses the tests start (they inherit this environment): most of the suite's time is XLA
# compiling tiny models, and the same programs come back across tests and files (the tiny
# CMMPNet's initialiser and its train and eval steps in test_train's runs, test_sharding's 1-device
# run and test_main's main.py). The controller makes the folder before it starts the workers and
# removes it at the end; a folder given in JAX_COMPILATION_CACHE_DIR is used as it is and kept
# (`make test-fast` keeps one across runs: entries are keyed by program, jaxlib version and XLA
# flags, so a stale one is never hit).
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="cmmp-jax-test-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
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


# The order in which xdist (`-n 2`, the scheduler below) hands out the work, one test (or one
# KEEP_TOGETHER unit) at a time to whichever worker is nearly idle. Tests match by node-id prefix,
# the first match counting; ties keep the collection order; unlisted tests come last. Heaviest
# first (measured on a 2-core CPU from an empty cache), so that the long jobs start early and the
# many quick tests fill in at the end; and test_sharding's 1-device run, which compiles the tiny
# CMMPNet's initialiser, some minutes of test_models ahead of test_train and test_main, which
# then find it in the compilation cache instead of both workers compiling it at once.
RUN_ORDER = (
    "tests/test_sharding.py",
    "tests/test_parity_train_step.py",
    "tests/test_accelerator_check.py::test_the_one_command_runs_end_to_end_in_smoke_mode",
    "tests/test_models.py::test_every_model_runs_forward_and_backward[cmmpnet-resunet]",
    "tests/test_models.py::test_every_model_runs_forward_and_backward[cmmpnet-dlinknet34]",
    "tests/test_models.py::test_every_model_runs_forward_and_backward[gated_fusion-dlinknet34]",
    "tests/test_models.py::test_every_model_runs_forward_and_backward[cmmpnet-linknet34]",
    "tests/test_train.py",
    "tests/test_reliability.py",
    "tests/test_models.py::test_every_model_runs_forward_and_backward",
    "tests/test_benchmarks.py::test_entry_point_runs_end_to_end_and_writes_the_report",
    "tests/test_main.py",
    "tests/test_models.py::test_sun1d_decoder_shapes_and_bfloat16_compute",
    "tests/test_models.py::test_remat_gives_the_same_parameters_logits_and_gradients",
    "tests/test_benchmarks.py::test_bfloat16_step_agrees_and_remat_step_matches_float32",
    "tests/test_parity.py",
    "tests/test_models.py",
)

# Tests that share an expensive module fixture: one worker runs each of these units whole, so the
# fixture is built once (test_sharding's 1-device subprocess, test_train's training run,
# test_parity's converted release weights, test_models' tiny CMMPNet for the DEM ablations).
# (xdist's own `--dist loadgroup` would do this with xdist_group marks, but with pytest 9.2 it
# silently stops grouping: pytest-xdist issue #1386.)
KEEP_TOGETHER = ("tests/test_sharding.py", "tests/test_train.py", "tests/test_reliability.py",
                 "tests/test_parity.py",
                 "tests/test_models.py::test_dem_ablations_change_tree_and_output")


def _rank(item) -> int:
  for rank, prefix in enumerate(RUN_ORDER):
    if item.nodeid.startswith(prefix):
      return rank
  return len(RUN_ORDER)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_rank)  # stable, and the same on every xdist worker


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """xdist's default `--dist load`, with each KEEP_TOGETHER prefix a single unit of work, handed
  out in collection order (RUN_ORDER); an explicit other --dist keeps its own scheduler."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class RunOrderScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return next((prefix for prefix in KEEP_TOGETHER if nodeid.startswith(prefix)), nodeid)

  config.option.loadscopereorder = False  # (LoadScope would put the units with most tests first)
  return RunOrderScheduling(config, log)


def pytest_sessionfinish(session):
  if _OWN_CACHE_DIR and not hasattr(session.config, "workerinput"):  # the controller
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
