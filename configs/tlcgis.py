"""TLCGIS (Parajuli et al., SIGSPATIAL 2018): aerial RGB + lidar (depth_lpu), 500x500 tiles
resized to 512 as the release does (evaluated against the 500x500 labels), 50 epochs.

Build: `python -m data_builders.build tlcgis --manual_dir=... --data_dir=data`.
"""
from configs import default, presets


def get_config(preset: str = ""):
  config = default.get_config()
  config.unlock()
  config.data.name = "tlcgis"
  config.data.config = ""  # the builder has one configuration
  config.data.input_size = 512
  config.data.num_workers = 4
  config.init.imagenet = True  # ImageNet ResNet-34 encoders, as the release's (default.py)
  config.num_epochs = 50
  config.predict.window = 512
  return presets.apply(config, preset)
