"""Every setting is checked before anything compiles, with the field named in one line: bad
values (config_checks.validate), batch sizes the devices do not divide, unusable workdirs, and a
misspelt --config.field, as main.py shows them (one line on stderr, no traceback)."""
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from cmmp_jax import config_checks
from cmmp_jax.graphs import params as graph_params
from configs import default, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**fields):
  config = synthetic.get_config()
  config.update_from_flattened_dict(fields)
  return config


@pytest.mark.parametrize("field, value, message", [
    ("log_every_steps", 0, "config.log_every_steps must be > 0, got 0"),
    ("log_every_steps", -3, "config.log_every_steps must be > 0, got -3"),
    ("eval_every_steps", -1, "config.eval_every_steps must be >= 0, got -1"),
    ("checkpoint_every_steps", -2, "config.checkpoint_every_steps must be >= 0, got -2"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be > 0, got 0"),
    ("eval.checkpoint", "bestt", "config.eval.checkpoint must be 'best', 'latest' or a step "
                                 "number, got 'bestt'"),
    ("eval.checkpoint", "-5", "config.eval.checkpoint must be 'best', 'latest' or a step"),
    ("seed", -1, "config.seed must be >= 0, got -1"),
    ("num_epochs", -2, "config.num_epochs must be >= 0, got -2"),
    ("model.width", 0.0, "config.model.width must be in (0, inf), got 0.0"),
    ("model.depths", (1, 1, 1), "config.model.depths must be a tuple of 4 integers >= 1"),
    ("model.spp_levels", (1, 0), "config.model.spp_levels must be a non-empty tuple of"),
    ("model.aux_channels", 0, "config.model.aux_channels must be > 0, got 0"),
    ("data.input_size", 500, "config.data.input_size must be 0 or a positive multiple of 32"),
    ("data.num_workers", -1, "config.data.num_workers must be >= 0, got -1"),
    ("data.train_split", "", "config.data.train_split must be a non-empty string"),
    ("optimizer.plateau_factor", 1.0, "config.optimizer.plateau_factor must be in (1, inf)"),
    ("optimizer.b2", 1.0, "config.optimizer.b2 must be in [0, 1), got 1.0"),
    ("optimizer.eps", 0.0, "config.optimizer.eps must be in (0, inf)"),
    ("optimizer.grad_clip_norm", -1.0, "config.optimizer.grad_clip_norm must be in [0, inf)"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate must be a number"),
    ("optimizer.warmup_steps", -1, "config.optimizer.warmup_steps must be >= 0"),
    ("image_summaries", -1, "config.image_summaries must be >= 0, got -1"),
    ("profile_start_step", -2, "config.profile_start_step must be >= -1, got -2"),
    ("profile_num_steps", 0, "config.profile_num_steps must be > 0, got 0"),
    ("predict.window", 100, "config.predict.window must be 0 or a positive multiple of 32"),
    ("predict.threshold", 1.5, "config.predict.threshold must be in [0, 1], got 1.5"),
    ("predict.num_examples", -1, "config.predict.num_examples must be >= 0"),
    ("graph.threshold", 2.0, "config.graph.threshold must be in [0, 1], got 2.0"),
    ("graph.min_blob_area", -4, "config.graph.min_blob_area must be finite and >= 0"),
])
def test_each_bad_value_is_a_one_line_error_naming_the_field(field, value, message):
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.validate(_config(**{field: value}))
  text = str(raised.value)
  assert "\n" not in text
  assert text.startswith(message), text


def test_combinations_are_checked():
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.predict.overlap = 64 must be smaller than the prediction "
                           r"window \(64: "):
    config_checks.validate(_config(**{"predict.window": 64, "predict.overlap": 64}))
  # No window: the training input size, else 512, is the window.
  with pytest.raises(config_checks.ConfigError, match=r"window \(128: "):
    config_checks.validate(_config(**{"predict.window": 0, "data.input_size": 128,
                                      "predict.overlap": 200}))
  config_checks.validate(_config(**{"predict.window": 0, "predict.overlap": 200}))  # < 512
  with pytest.raises(config_checks.ConfigError, match="batch_norm_group_size = 3 must be 0"):
    config_checks.validate(_config(batch_size=8, batch_norm_group_size=3))


@pytest.mark.parametrize("checkpoint", ["best", "latest", "12", "0"])
def test_valid_checkpoint_choices_pass(checkpoint):
  assert config_checks.validate(_config(**{"eval.checkpoint": checkpoint})) == []


def test_num_train_steps_without_effect_warns():
  (warning,) = config_checks.validate(_config(num_train_steps=-5))
  assert warning.startswith("config.num_train_steps = -5 has no effect")
  assert "config.num_epochs = 12 epochs" in warning  # synthetic.py's
  (warning,) = config_checks.validate(_config(num_train_steps=0))
  assert "config.num_train_steps = 0 has no effect" in warning
  assert config_checks.validate(_config(num_train_steps=-1)) == []  # the default: epochs
  assert config_checks.validate(_config(num_train_steps=6)) == []


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_field_of_the_default_config_has_a_rule():
  """A field added to configs/default.py needs a rule in config_checks.RULES (or, for
  config.graph, a GraphParams field, which its constructor checks)."""
  graph_fields = {f"graph.{name}" for name in graph_params.GraphParams.__dataclass_fields__}
  missing = [field for field in _leaves(default.get_config())
             if field not in config_checks.RULES and field not in graph_fields]
  assert not missing, (f"fields without a rule in config_checks.RULES: {missing}; add one "
                      "(what a wrong value must be refused for, before anything compiles)")
  assert not set(config_checks.RULES) - set(_leaves(default.get_config()))  # no stale rules


def test_batch_sizes_the_devices_do_not_divide_name_the_field(monkeypatch):
  config = _config(batch_size=8, eval_batch_size=6)
  config_checks.check_devices(config)  # 1 CPU device here: every size divides
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(config_checks.ConfigError,
                     match=r"^config.eval_batch_size = 6 is not divisible by the 4 devices "
                           r"\(1 process\(es\)\).*use a multiple of 4$"):
    config_checks.check_devices(config)
  config.batch_size = 6
  with pytest.raises(config_checks.ConfigError, match="^config.batch_size = 6 is not divisible"):
    config_checks.check_before_training(config, num_train_examples=100)
  with pytest.raises(config_checks.ConfigError,
                     match=r"^config.batch_size = 8 exceeds the 4 examples of split 'train'"):
    config_checks.check_training_split(_config(batch_size=8), num_train_examples=4)


def test_workdirs_that_are_files_or_under_files_are_refused(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("not a folder")
  with pytest.raises(config_checks.ConfigError, match=f"^--workdir {a_file} is a file, not a "
                                                      "folder; give a folder$"):
    config_checks.check_workdir(a_file)
  with pytest.raises(config_checks.ConfigError,
                     match=f"^--workdir {a_file}/run/1 lies under {a_file}, which is a file"):
    config_checks.check_workdir(a_file / "run" / "1")
  made = config_checks.check_workdir(tmp_path / "new" / "run")
  assert made.is_dir() and not list(made.iterdir())  # made, and the probe file is gone
  assert a_file.read_text() == "not a folder"  # nothing a user had is touched


def test_a_read_only_workdir_is_refused(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  if os.geteuid() == 0:
    # root writes into a mode 0555 folder regardless; an immutable one refuses even root.
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True,
                      check=False).returncode:
      pytest.skip("running as root on a filesystem without chattr +i: cannot make a folder "
                  "read-only")
  else:
    locked.chmod(0o555)
  try:
    for target in (locked, locked / "run"):
      with pytest.raises(config_checks.ConfigError) as raised:
        config_checks.check_workdir(target)
      assert re.fullmatch(
          f"--workdir {target} is not writable \\((Permission denied|Operation not permitted)\\); "
          "checkpoints, logs and results go there: give a writable folder",
          str(raised.value)), str(raised.value)
    assert not list(locked.iterdir())
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(locked)], check=False)
    locked.chmod(0o755)


def _parse_error(*args):
  """The exception an entry point's --config flag raises for `prog ARGS`."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv,
                                  lock_config=True)
  with pytest.raises((AttributeError, KeyError)) as raised:
    flag_values(argv)
  return raised.value, argv


def test_a_misspelt_field_is_named_with_the_suggestion_plainly():
  error, argv = _parse_error("--config=configs/synthetic.py", "--config.model.widht=0.5")
  assert config_checks.unknown_field_message(error, argv) == (
      "--config.model.widht: config.model has no field 'widht'; did you mean "
      "config.model.width? (see configs/default.py for every field)")
  error, argv = _parse_error("--config=configs/synthetic.py", "--config.modle.width=0.5")
  assert config_checks.unknown_field_message(error, argv) == (
      "--config.modle.width: config has no field 'modle'; did you mean config.model? (see "
      "configs/default.py for every field)")
  error, argv = _parse_error("--config=configs/synthetic.py", "--config.zzzz=1")
  assert config_checks.unknown_field_message(error, argv) == (
      "--config.zzzz: config has no field 'zzzz' (see configs/default.py for every field)")
  # Not about a --config override: left to the caller (a traceback, as for any other bug).
  assert config_checks.unknown_field_message(KeyError("'other'"), ["prog"]) is None


def _main(*args, env=None):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # two runs of main.py, each importing TensorFlow (clu's summary writers)
def test_main_prints_one_line_for_bad_settings(tmp_path):
  """As a user sees them: one `error:` line on stderr, status 1, nothing compiled or written.
  The two ways there: a misspelt field fails while absl parses the flags; a bad value (here
  the workdir) when main() checks the parsed config."""
  common = ["--config=configs/synthetic.py", f"--config.data.data_dir={tmp_path / 'data'}"]
  misspelt = _main(*common, "--config.log_evry_steps=3", f"--workdir={tmp_path / 'w'}")
  assert misspelt.returncode == 1
  assert misspelt.stderr.strip().splitlines() == [
      "error: --config.log_evry_steps: config has no field 'log_evry_steps'; did you mean "
      "config.log_every_steps? (see configs/default.py for every field)"], misspelt.stderr
  a_file = tmp_path / "w.txt"
  a_file.write_text("")
  under_file = _main(*common, f"--workdir={a_file}/run")
  assert under_file.returncode == 1
  assert under_file.stderr.strip().splitlines() == [
      f"error: --workdir {a_file}/run lies under {a_file}, which is a file, not a folder; "
      "give a folder"], under_file.stderr
  assert not (tmp_path / "data").exists() and not (tmp_path / "w").exists()
