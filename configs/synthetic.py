"""The embedded default: the procedural synthetic city, a tiny CMMPNet, CPU-sized.

`python main.py --config=configs/synthetic.py --workdir=runs/demo` builds the dataset if absent and
trains in a few minutes on a 2-core CPU; `make demo` then evaluates (`--mode=eval`) and predicts
(`--mode=predict`) with the same workdir. Presets as in default.py, e.g.
`configs/synthetic.py:image_only`.
"""
from configs import default, presets


def get_config(preset: str = ""):
  config = default.get_config()
  config.unlock()
  config.data.name = "synthetic"
  config.data.config = "default"     # 128 px tiles, 64 / 16 / 16
  config.data.build_if_missing = True
  config.data.augment = True
  config.model.width = 0.25          # 16, 32, 64, 128 channels
  config.model.depths = (1, 1, 1, 1)
  # From scratch: ImageNet ResNet-34 weights (the release's init, default.py) do not fit these
  # tiny widths and depths, and tests / `make demo` must run offline.
  config.init.imagenet = False
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_epochs = 12
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.eval_every_steps = 24       # three epochs of 8 steps
  config.log_every_steps = 8
  config.predict.window = 128
  config.predict.overlap = 32
  return presets.apply(config, preset)
