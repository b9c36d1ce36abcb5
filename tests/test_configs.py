"""Every preset loads on every dataset config it applies to and sets what it says; the command line
(absl + ml_collections config_flags, as every entry point parses it) names a misspelt field, an
unknown preset or a value outside its choices."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from cmmp_jax import config_checks
from cmmp_jax.models import summary
from configs import bjroad, porto, presets, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]

DATASETS = ["bjroad", "porto", "tlcgis", "synthetic"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_preset_loads_and_validates(dataset):
  module = importlib.import_module(f"configs.{dataset}")
  for name in presets.PRESETS:
    if name == "foggy" and dataset in ("porto", "tlcgis"):
      with pytest.raises(ValueError, match="'foggy' exists for bjroad and synthetic"):
        module.get_config(name)
      continue
    config_checks.validate(module.get_config(name))


def test_presets_set_their_fields_and_combine():
  config = bjroad.get_config("foggy,early_fusion,bf16,remat,gpu")
  assert config.data.config == "foggy" and config.model.name == "early_fusion"
  assert config.model.dtype == "bfloat16" and config.model.remat
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in config.xla_flags
  assert porto.get_config("fold3").data.config == "fold_3"
  spp = bjroad.get_config("spp4").model.spp_levels
  assert tuple(spp) == (1, 2, 4, 8)
  # Applied in order: the later preset wins.
  assert bjroad.get_config("image_only,late_fusion").model.name == "late_fusion"


def _parse(*args):
  """The --config flag of an entry point, parsed from `prog ARGS` on a fresh FlagValues."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv,
                                  lock_config=True)
  flag_values(argv)
  return flag_values.config


def test_command_line_presets_overrides_and_their_errors():
  config = _parse("--config=configs/synthetic.py:image_only,bf16", "--config.num_epochs=48",
                  "--config.model.depths=(2,2,2,2)")
  config_checks.validate(config)
  assert (config.model.name, config.model.dtype, config.num_epochs) == (
      "image_only", "bfloat16", 48)
  assert tuple(config.model.depths) == (2, 2, 2, 2)
  assert config.model.width == 0.25  # the rest is the file's
  with pytest.raises(AttributeError, match="widht"):
    _parse("--config=configs/synthetic.py", "--config.model.widht=0.5")
  with pytest.raises(flags.IllegalFlagValueError, match="unknown config preset 'imageonly'"):
    _parse("--config=configs/synthetic.py:imageonly")
  with pytest.raises(ValueError, match="config.model.backbone"):
    config_checks.validate(_parse("--config=configs/synthetic.py", "--config.model.backbone=vgg16"))


def test_configs_are_locked_and_values_are_checked():
  config = bjroad.get_config()
  with pytest.raises(AttributeError, match="widht"):
    config.model.widht = 0.5
  with pytest.raises(KeyError, match="widht"):
    config.update_from_flattened_dict({"model.widht": 0.5})
  for field, value, message in [("model.dtype", "float16", "config.model.dtype"),
                                ("optimizer.schedule", "linear", "config.optimizer.schedule"),
                                ("batch_size", 0, "config.batch_size must be > 0")]:
    config = bjroad.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=message):
      config_checks.validate(config)
  config = bjroad.get_config()
  config.update_from_flattened_dict({"num_epochs": 0, "num_train_steps": -1})
  with pytest.raises(ValueError, match="num_epochs or config.num_train_steps"):
    config_checks.validate(config)


def test_an_entry_point_reads_presets_and_overrides_from_its_command_line(tmp_path):
  """`python -m cmmp_jax.models.summary` as a user runs it: the preset and the override reach
  the model it counts (the DEM with local messages only has fewer parameters than the full one)."""
  out = tmp_path / "rows.json"
  done = subprocess.run(
      [sys.executable, "-m", "cmmp_jax.models.summary", "--config=configs/synthetic.py:local",
       "--config.model.width=0.125", "--sizes=64", "--models=cmmpnet", f"--json={out}"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "width 0.125" in done.stdout
  (row,) = json.loads(out.read_text())
  config = synthetic.get_config("local")
  config.update_from_flattened_dict({"model.width": 0.125})
  (expected,) = summary.summarize(config.model.to_dict(), ["cmmpnet"], [64])
  assert row == pytest.approx(expected)
  full = synthetic.get_config()
  full.update_from_flattened_dict({"model.width": 0.125})
  assert row["params"] < summary.summarize(full.model.to_dict(), ["cmmpnet"], [64])[0]["params"]


def test_auto_upsample_method_is_the_measured_fastest_per_backend():
  from cmmp_jax import models, state as state_lib  # pylint: disable=g-import-not-at-top
  config = bjroad.get_config()
  assert config.model.upsample_method == "auto"
  config_checks.validate(config)
  # CPU: subpixel was measured faster (benchmarks/NOTES.md C2); GPU and TPU keep XLA's native
  # form until the accelerator check has timed both there.
  assert models.resolve_upsample_method("auto", "cpu") == "subpixel"
  assert models.resolve_upsample_method("auto", "gpu") == "dilated"
  assert models.resolve_upsample_method("auto", "tpu") == "dilated"
  assert models.resolve_upsample_method("dilated", "cpu") == "dilated"  # explicit wins
  assert state_lib.model_from_config(config).upsample_method == "subpixel"  # tests run on CPU
  config.model.upsample_method = "transposed"
  with pytest.raises(ValueError, match="model.upsample_method"):
    config_checks.validate(config)
