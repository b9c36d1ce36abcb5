"""Every preset loads on every dataset config it applies to and sets what it says."""
import pytest

from cmmp_jax import configs

DATASETS = ["bjroad", "porto", "tlcgis", "synthetic"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_preset_loads_and_validates(dataset):
  for name in configs.PRESETS:
    spec = f"configs/{dataset}.py:{name}"
    if name == "foggy" and dataset in ("porto", "tlcgis"):
      with pytest.raises(ValueError, match="'foggy' exists for bjroad and synthetic"):
        configs.load_config(spec)
      continue
    config = configs.load_config(spec)
    configs.validate(config)


def test_presets_set_their_fields_and_combine():
  config = configs.load_config("configs/bjroad.py:foggy,early_fusion,bf16,remat,gpu")
  assert config.data.config == "foggy" and config.model.name == "early_fusion"
  assert config.model.dtype == "bfloat16" and config.model.remat
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in config.xla_flags
  assert configs.load_config("configs/porto.py:fold3").data.config == "fold_3"
  spp = configs.load_config("configs/bjroad.py:spp4").model.spp_levels
  assert tuple(spp) == (1, 2, 4, 8)
