"""BJRoad (Sun et al., CVPR 2019) with the CMMPNet release's protocol: D-LinkNet-34 CMMPNet,
Adam 1e-4, batch 4 x 2 GPUs, BCE + Dice, 30 epochs with the plateau schedule, inputs 1024 -> 512
for training and evaluation (labels stay 1024), the reference's augmentations.

Build the data first: `python -m data_builders.build bjroad --config release --manual_dir=...
--data_dir=data`. Presets: the paper's table rows, e.g. `configs/bjroad.py:image_only`,
`:local_gate`, `:spp4`, `:resunet`, `:foggy`.
"""
from configs import default, presets


def get_config(preset: str = ""):
  config = default.get_config()
  config.unlock()
  config.data.name = "bjroad"
  config.data.config = "release"
  config.data.input_size = 512
  config.data.augment = True
  config.init.imagenet = True  # ImageNet ResNet-34 encoders, as the release's (default.py)
  config.data.num_workers = 4
  config.num_epochs = 30
  # Prediction sees inputs at the training scale (1024 -> 512): windows of the model's 512.
  config.predict.window = 512
  config.predict.overlap = 64
  return presets.apply(config, preset)
