"""Your own area: a GeoTIFF, road centerlines and (optionally) GPS, built by data_builders.custom.

Set these (on the command line as --config.FIELD=VALUE, or in a copy of this file):
  data.manual_dir     the folder holding custom.json (or custom.yaml): imagery, roads, gps,
                      gps_crs, bit_depth, tile_size, ... (data_builders/custom/custom.py,
                      CustomSpec). The first run builds the dataset from it.
  data.data_dir       where the dataset is written: DATA_DIR/custom/default/VERSION. One area
                      per data_dir (the builder config is always 'default').
  data.input_size     0 trains on the spec's tile_size as it is; e.g. 512 with tile_size 1024
                      trains (and predicts) at half resolution, as BJRoad's protocol does.
  predict.input_dir   for --mode=predict: the original GeoTIFF (or a folder of them).
  predict.gps_csv     for --mode=predict: the GPS CSV(s) to render heat-maps from (read with
                      the dataset's recorded gps_crs and columns); or predict.blank_aux=True.

  python main.py --config=configs/custom.py --workdir=runs/area \\
      --config.data.manual_dir=area/ --config.data.data_dir=data_area
  python main.py --config=configs/custom.py --workdir=runs/area --mode=eval \\
      --config.data.data_dir=data_area
  python main.py --config=configs/custom.py --workdir=runs/area --mode=predict \\
      --config.data.data_dir=data_area --config.predict.input_dir=area/area.tif \\
      --config.predict.gps_csv=area/trips.csv

Prediction reuses how the dataset was prepared (its metadata.json: bands, bit depth, GPS CRS,
heat-map tile grid) and the training scale; the GeoTIFFs it writes carry the input's CRS and
transform. Presets as in default.py, e.g. `configs/custom.py:image_only` (no GPS).
"""
from configs import default, presets


def get_config(preset: str = ""):
  config = default.get_config()
  config.unlock()
  config.data.name = "custom"
  config.data.config = "default"     # the spec is read from custom.json in data.manual_dir
  config.data.data_dir = "data"
  config.data.manual_dir = ""        # SET: the folder with custom.json and the area's files
  config.data.input_size = 0         # 0 = train at the spec's tile_size
  config.data.augment = True         # the reference's paired augmentations
  config.init.imagenet = True        # ImageNet ResNet-34 encoders, as the release's
  config.num_epochs = 30
  config.eval.split = "test"
  config.predict.window = 512        # at the model's scale (tile_size, or input_size)
  config.predict.overlap = 64
  config.predict.input_dir = ""      # SET for --mode=predict: the original GeoTIFF
  config.predict.gps_csv = ""        # SET for --mode=predict with GPS
  return presets.apply(config, preset)
