"""Porto (CMMPNet paper): 512x512 tiles, five-fold cross-validation, 50 epochs, no augmentation.

Select the fold with a preset (`configs/porto.py:fold3`) or `--config.data.config=fold_3`.
Build: `python -m data_builders.build porto --config fold_1 --manual_dir=... --data_dir=data`.
"""
from configs import default, presets


def get_config(preset: str = ""):
  config = default.get_config()
  config.unlock()
  config.data.name = "porto"
  config.data.config = "fold_1"
  config.data.num_workers = 4
  config.init.imagenet = True  # ImageNet ResNet-34 encoders, as the release's (default.py)
  config.num_epochs = 50
  config.predict.window = 512
  return presets.apply(config, preset)
