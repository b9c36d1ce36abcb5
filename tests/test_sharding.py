"""Data parallelism: the same global batch on 1 and on 8 simulated CPU devices gives the same loss
and updated parameters (BatchNorm statistics of the global batch), and two jax.distributed
processes on localhost train a step together, each feeding its own half of the batch. (All three
start from the state that the 1-device run initialises.)"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import flax, jax, numpy as np
    out, variables_file, *distributed = sys.argv[1:]
    if distributed:  # multi-process: coordinator, process id
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(distributed[0], num_processes=2, process_id=int(distributed[1]))
    from cmmp_jax import config_checks, sharding, steps
    from cmmp_jax import state as state_lib
    from configs import synthetic
    config = synthetic.get_config()
    config.update_from_flattened_dict({
        "model.width": 0.125, "model.depths": (1, 1, 1, 1), "batch_size": 8,
        "optimizer.schedule": "constant",
        # Adam divides by sqrt(v) + eps: with the default 1e-8, weights whose gradient is ~0
        # turn reduction-order rounding into +-lr steps. A larger eps keeps the comparison to
        # float tolerance without changing what is compared.
        "optimizer.eps": 1e-3})
    config_checks.validate(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1.6, 1.6, (8, 32, 32, 3)).astype(np.float32),
             "aux": rng.uniform(-1.6, 1.6, (8, 32, 32, 1)).astype(np.float32),
             "mask": (rng.uniform(size=(8, 32, 32, 1)) > 0.7).astype(np.float32)}
    n, i = jax.process_count(), jax.process_index()
    local = {k: v[i * 8 // n:(i + 1) * 8 // n] for k, v in batch.items()}
    mesh = sharding.make_mesh()
    if jax.device_count() == 1:  # the reference run: state_lib.init_state, whose start it saves
      variables, run_key = state_lib.init_variables(config, (1, 32, 32, 3), (1, 32, 32, 1))
      with open(variables_file, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(
            {**jax.device_get(variables), "rng": np.asarray(run_key)}))
    else:  # the same start (its initialiser would compile anew for another device topology)
      with open(variables_file, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
      run_key = variables.pop("rng")
    model, state = state_lib.create_state(config, variables, 10, run_key)
    state = sharding.put_replicated(state, mesh)
    batch = sharding.to_global_batch(local, mesh)
    step = steps.make_train_step(model, config, mesh).lower(state, batch).compile()
    if n > 1:
      # Processes compile at different speeds on a loaded machine; meet before the first
      # collective so that gloo's 30 s connection timeout cannot expire (what train does).
      sharding.sync_processes("compiled")
    losses = []
    for _ in range(2):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
    if i == 0:  # every parameter and statistic after the steps, whole
      np.savez(out + ".npz", *[np.asarray(jax.device_get(x)) for x in leaves])
      json.dump({"devices": jax.device_count(), "losses": losses}, open(out, "w"))
""")


def _run(tmp_path, devices, variables_file, procs=1):
  """STEP_SCRIPT on `devices` simulated CPU devices in each of `procs` processes. The 1-device run
  initialises the model and saves its start in variables_file; the others start from it."""
  script = tmp_path / "step.py"
  script.write_text(STEP_SCRIPT)
  out = tmp_path / f"out_{devices}_{procs}.json"
  # The test session's XLA flags (tests/conftest.py: faster compiles, the same results) plus the
  # device count (which the compilation cache's key leaves out): the 1-device run's initialiser of
  # the tiny CMMPNet is then the very program that test_train and test_main use, compiled once per
  # session (the session's compilation cache).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                f"--xla_force_host_platform_device_count={devices}"]).strip()}
  if procs == 1:
    subprocess.run([sys.executable, str(script), str(out), str(variables_file)], cwd=REPO, env=env,
                   check=True, timeout=600)
  else:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    running = [subprocess.Popen([sys.executable, str(script), str(out), str(variables_file),
                                 f"localhost:{port}", str(p)], cwd=REPO, env=env)
               for p in range(procs)]
    codes = [p.wait(timeout=600) for p in running]
    assert codes == [0] * procs, codes
  result = json.loads(out.read_text())
  with np.load(f"{out}.npz") as leaves:
    result["leaves"] = [leaves[f"arr_{i}"] for i in range(len(leaves.files))]
  return result


def _assert_same_state(result, reference):
  """Every parameter and BatchNorm statistic, element by element (sums would hide a leaf whose
  values moved in opposite directions, or two swapped leaves of one shape)."""
  assert len(result["leaves"]) == len(reference["leaves"])
  for index, (got, want) in enumerate(zip(result["leaves"], reference["leaves"])):
    assert got.shape == want.shape, index
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"leaf {index}")


import pytest

# (Under xdist one worker runs the whole module, so that `one_device` is computed once: KEEP_TOGETHER
# in tests/conftest.py.)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The 1-device result, and the file of the initial state that the other runs start from."""
  folder = tmp_path_factory.mktemp("one")
  return _run(folder, 1, folder / "variables.msgpack"), folder / "variables.msgpack"


def test_one_device_equals_eight_devices(tmp_path, one_device):
  one, variables_file = one_device
  eight = _run(tmp_path, 8, variables_file)
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  _assert_same_state(eight, one)


def test_two_processes_train_a_step_together(tmp_path, one_device):
  one, variables_file = one_device
  two = _run(tmp_path, 1, variables_file, procs=2)
  assert two["devices"] == 2
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  _assert_same_state(two, one)


def _main_py_two_processes(workdir, data_dir, steps, log_name, terminate_process_1_at=None,
                           mode="train"):
  """Runs main.py --mode=MODE as two jax.distributed processes; returns their exit codes and
  logs."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
  logs = [workdir.parent / f"{log_name}.{i}.log" for i in range(2)]
  running = []
  for i in range(2):
    running.append(subprocess.Popen([
        sys.executable, "main.py", "--config=configs/synthetic.py", f"--workdir={workdir}",
        "--config.data.config=tiny", f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={steps}", "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=3", "--config.log_every_steps=3",
        "--config.batch_size=2", "--config.eval_batch_size=2", "--config.model.width=0.125",
        "--config.model.depths=(1,1,1,1)", f"--coordinator_address=localhost:{port}",
        "--num_processes=2", f"--process_id={i}", f"--mode={mode}"], cwd=REPO, env=env,
        stdout=open(logs[i], "w"), stderr=subprocess.STDOUT))
  if terminate_process_1_at is not None:
    deadline = time.time() + 600
    progress_1 = workdir / "log.1.txt"  # process 1's progress lines go to its log file only
    while not progress_1.exists() or f"step {terminate_process_1_at}/" not in (
        progress_1.read_text()):
      assert time.time() < deadline and running[1].poll() is None, logs[1].read_text()[-3000:]
      time.sleep(0.5)
    running[1].terminate()  # SIGTERM: a preemption notice to one host only
  codes = [p.wait(timeout=900) for p in running]
  return codes, [log.read_text() for log in logs]


@pytest.mark.skipif(os.environ.get("CMMP_TEST_SLOW") != "1",
                    reason="3-7 minutes of 2-core CPU; set CMMP_TEST_SLOW=1 (README, Tests)")
def test_main_py_on_two_processes_trains_resumes_and_survives_a_preemption(tmp_path):
  """The whole loop on two jax.distributed processes: dataset built by process 0 while process 1
  waits, checkpoints (latest and best at the same step), evaluation gathers, per-process
  prediction shares; then a resume, and a SIGTERM to process 1 alone makes both save the same
  step and exit cleanly."""
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  codes, logs = _main_py_two_processes(workdir, data_dir, 6, "first")
  assert codes == [0, 0], [log[-3000:] for log in logs]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "3", "6"]
  assert {p.name for p in (workdir / "checkpoints" / "6" / "data_iter").iterdir()} >= {
      "process_0-of-2.json", "process_1-of-2.json"}
  codes, logs = _main_py_two_processes(workdir, data_dir, 6, "eval", mode="eval")
  assert codes == [0, 0], [log[-3000:] for log in logs]
  assert list(workdir.glob("eval_test_*.json")), sorted(p.name for p in workdir.iterdir())
  codes, logs = _main_py_two_processes(workdir, data_dir, 6, "predict", mode="predict")
  assert codes == [0, 0], [log[-3000:] for log in logs]
  # One tile each: its probability, road and label PNGs, graph GeoJSON / GraphML and overlay.
  assert "6 files by process 0" in logs[0] and "6 files by process 1" in logs[1]
  assert len(list((workdir / "predictions").glob("*_prob.png"))) == 2
  codes, logs = _main_py_two_processes(workdir, data_dir, 400, "second",
                                       terminate_process_1_at=12)
  # Both save the same step and exit 143 (128 + SIGTERM: preempted), process 0 with the group.
  assert codes == [143, 143], [log[-3000:] for log in logs]
  saved = [line for log in logs for line in log.splitlines()
           if line.startswith("SIGTERM: saving step")]
  assert len(saved) == 2 and saved[0] == saved[1], saved  # the same step on both processes
  # Process 0 prints it; every process logs it (process 1's console carries only its own lines).
  assert f"SIGTERM: saved step {saved[0].split()[3]} in" in logs[0]  # where, for the user
  assert "Resumed from step 6" in logs[0]
  assert "Resumed from step 6" in (workdir / "log.1.txt").read_text()
  step = int(saved[0].split()[3])
  assert step >= 12 and (workdir / "checkpoints" / str(step)).is_dir()
