"""Every configuration field, documented, with the reference release's protocol as defaults.

Dataset configs (bjroad.py, porto.py, tlcgis.py, synthetic.py) start from this one. Presets are
chosen as `--config=configs/bjroad.py:NAME` (several joined by commas, applied in order; see
`configs/presets.py` for the rows of the paper's tables) and any field is overridden by
`--config.a.b=value`. The returned ConfigDict is locked: a misspelt field is an error. In Python:
`from configs import bjroad; config = bjroad.get_config("image_only")`; the entry points check the
values with `cmmp_jax.config_checks.validate(config)`.
"""
import ml_collections

from configs import presets


def get_config(preset: str = ""):
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model (cmmp_jax.models.build_model). Defaults = the release's DinkNet34_CMMPNet.
  config.model = ml_collections.ConfigDict(dict(
      name="cmmpnet",           # cmmpnet | image_only | aux_only | early_fusion | late_fusion
                                # | gated_fusion
      backbone="dlinknet34",    # dlinknet34 | linknet34 | resunet
      width=1.0,                # channel multiplier (1.0 = ResNet-34 widths 64..512)
      depths=(3, 4, 6, 3),      # basic blocks per encoder layer
      aux_channels=1,           # 1 = heat-map or lidar; more for GPS speed/heading channels
      use_local=True, use_global=True, use_gate=True,  # DEM ablations (paper Table IV)
      spp_levels=(1, 2, 4),     # SPP bins per side (paper Fig. 8)
      local_kernel_size=1,      # 1 = release, 3 = paper text
      decoder="linknet",        # linknet | sun1d (Sun et al.'s 1D transposed convs)
      # auto | dilated | subpixel: the same transposed convolutions, computed with the
      # zero-dilated input or as four stride-1 convolutions interleaved; 'auto' takes the one
      # measured faster on the backend (state.AUTO_UPSAMPLE_METHOD; logged at start).
      upsample_method="auto",
      dtype="float32",          # compute dtype: float32 | bfloat16 (params stay float32)
      remat=False,              # rematerialise stem, blocks and DEMs (memory for FLOPs)
  ))
  # Initialisation (cmmp_jax.convert.init_encoders, README "Training"). The release builds both
  # encoders from torchvision's ImageNet ResNet-34 (models.resnet34(pretrained=True)); the
  # auxiliary stem keeps its own new 1-channel conv. The weights file is, in order:
  # resnet34_checkpoint if set; else resnet34-b627a593.pth in cache_dir (or torchvision's own
  # cache, ~/.cache/torch/hub/checkpoints); else a one-time download from download.pytorch.org
  # into cache_dir (SHA-256 prefix b627a593 checked) when download=True. Offline without the
  # file: an error saying what to fetch and where to put it.
  config.init = ml_collections.ConfigDict(dict(
      imagenet=True,            # False = train from scratch (random init; the explicit opt-out)
      resnet34_checkpoint="",   # a local torchvision ResNet-34 state_dict (.pth or .npz)
      cache_dir="",             # "" = $CMMP_JAX_CACHE, else ~/.cache/cmmp_jax
      download=True,            # allow the one-time download when the file is missing
      # release: the stem's input channels reversed, so that our RGB input meets the filters the
      # release applied to its BGR pixels (torchvision's RGB filters on OpenCV's BGR) | rgb: the
      # filters on the channels they were trained on (ImageNet's meaning, not the release's).
      image_stem="release",
  ))

  config.data = ml_collections.ConfigDict(dict(
      name="synthetic",         # TFDS builder: synthetic | bjroad | porto | tlcgis | custom
      config="default",         # its builder config
      data_dir="data",          # where TFDS datasets live (relative to the working directory)
      manual_dir="",            # manual downloads, to build a missing dataset
      build_if_missing=False,   # build the dataset on first use (synthetic / manual_dir)
      train_split="train", eval_split="validation", test_split="test",
      input_size=0,             # resize image and aux to this side (0 = keep); labels keep theirs
      augment=False,            # the reference's paired augmentations (BJRoad protocol)
      scaling="reference",      # reference: x/255*3.2-1.6 | unit: x/255
      num_workers=0,            # grain worker processes (0 = in-process)
  ))

  config.batch_size = 8         # global (all devices, all processes); release: 4 x 2 GPUs
  config.eval_batch_size = 8    # also the batch over which the published A_IoU is averaged
  # BatchNorm's batch statistics over groups of this many images (0: the whole global batch).
  # 4 with batch 8 is the release: DataParallel on 2 GPUs, 4 images per GPU, running statistics
  # from the first GPU's replica (steps.make_loss_fn).
  config.batch_norm_group_size = 4
  config.num_epochs = 30
  config.num_train_steps = -1   # > 0 overrides num_epochs

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,       # release scripts (the paper says 2e-4)
      schedule="plateau",       # plateau (release) | cosine | constant
      plateau_patience=5,       # evaluations without a better val G_IoU before lr /= factor
      plateau_factor=10.0,
      min_learning_rate=1e-8,   # plateau: stop at a plateau when lr is already below this
      reset_learning_rate=False,  # resuming: restart at learning_rate instead of the checkpoint's
      warmup_steps=0,           # cosine only
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.0,       # > 0 clips the global gradient norm
  ))
  config.loss = ml_collections.ConfigDict(dict(dice=True))  # BCE + soft Dice (False: BCE)

  config.eval_every_steps = 0   # 0 = once per epoch (the release)
  config.eval_on_test = True    # also score test at each evaluation (release reports test at the
                                # best-val epoch)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # 0 = at each evaluation
  config.keep_checkpoints = 3
  # Resuming a checkpoint trained with another seed, dataset, batch size or optimizer setting
  # (checkpoint.TRAJECTORY_FIELDS) is refused unless this is True.
  config.allow_changed_settings = False
  config.image_summaries = 4    # panels (image, aux, prediction, label) written per evaluation
  config.profile_start_step = -1  # >= 0 captures a profiler trace of a few steps from there
  config.profile_num_steps = 5
  config.xla_flags = ""         # extra XLA_FLAGS, set before JAX starts (see benchmarks/NOTES.md)

  config.eval = ml_collections.ConfigDict(dict(
      checkpoint="best",        # best | latest | a step number
      split="test",
      tta=False,                # average the 8 dihedral views
      # APLS and TOPO of the road graphs (config.graph's extraction) next to the pixel metrics
      # (cmmp_jax.graph_eval): per tile and as tile means, in the console, the JSON and the log.
      graph_metrics=True,
      metres_per_pixel=0.0,     # > 0 overrides the pixel size (else: from the dataset)
  ))
  config.predict = ml_collections.ConfigDict(dict(
      input_dir="",             # images (+ aux rasters or GPS); empty = a few tiles of the test split
      output_dir="",            # default: WORKDIR/predictions
      gps_csv="",               # raw GPS records to render aux rasters on the fly
      window=0,                 # sliding-window side (0 = training input size or 512)
      overlap=64,
      threshold=0.5,
      num_examples=4,           # tiles written when input_dir is empty
      blank_aux=False,          # allow inputs without any aux (an all-zero raster)
      # Input preparation (bands, bit depth, GPS columns/CRS, heat-map tile grid): "" = the
      # record in the metadata of config.data's dataset; else a JSON file (a dataset's
      # metadata.json, or an 'input_preparation' record alone; cmmp_jax.data.preparation).
      preparation="",
      # Streaming (cmmp_jax.stream): auto = georeferenced TIFFs larger than block_size on a
      # side are read by windows and written block by block as tiled GeoTIFFs (no PNGs), with
      # memory bounded by block/window/batch, resumable, shared by all processes in bands;
      # on = every input (an error when one cannot be); off = always in memory.
      stream="auto",
      block_size=4096,          # output block side (rounded up to whole heat-map tiles)
      compress="deflate",       # GeoTIFF compression of streamed outputs: deflate|lzw|zstd|none
      cog=False,                # streamed outputs as Cloud-Optimized GeoTIFFs
      # Process 0 writes the files once every band is done; it gives up (an error naming the
      # missing blocks; a rerun resumes) when no other process finished a block for this long.
      stream_wait_s=3600.0,     # seconds; 0 = wait without a limit
  ))
  # Road graphs from predictions (cmmp_jax.graphs; fields = graphs.GraphParams, lengths in
  # pixels, defaults for ~0.5 m/px). --mode=predict writes {stem}_graph.geojson, .graphml and
  # {stem}_overlay.png beside the road maps, from the whole stitched map of a mosaic.
  config.graph = ml_collections.ConfigDict(dict(
      enabled=True,             # write the graph files in --mode=predict
      wgs84=False,              # GeoJSON in lon/lat instead of the input's CRS
      threshold=0.5,            # road where probability > threshold
      min_blob_area=64,         # drop road blobs smaller than this (px)
      max_hole_area=64,         # fill holes smaller than this (px)
      junction_merge_distance=4.0,  # junctions closer than this along an edge become one
      junction_merge_radius_factor=0.5,  # ... or closer than this x the sum of their road radii
      spur_length=12.0,         # prune dead ends shorter than this ...
      spur_radius_factor=1.0,   # ... plus this x the road radius at their junction
      junction_straighten_radius_factor=1.0,  # edges run straight inside this x junction radius
      border_padding=32,        # edge-replicate the raster border by this before thinning
      border_snap_radius_factor=2.0,  # extend dead ends within this x their road radius ...
      border_snap_distance=0.0,  # ... plus this of the raster border onto the border
      simplify_tolerance=1.0,   # Douglas-Peucker tolerance
      bridge_max_distance=24.0,  # longest gap bridge (image only)
      bridge_max_angle=35.0,    # degrees off each dead end's direction
      bridge_direction_length=10.0,  # polyline length defining a dead end's direction
      bridge_min_detour=3.0,    # connected ends: bridge only if the graph path is this x longer
      bridge_to_edges=True,     # extend dead ends onto the edge they point at
      use_trajectories=False,   # GPS heat-map decides bridges and recovers missed roads
      heat_min=0.004,           # heat-map value (0..1) counted as a fix (uint8 heat-maps: >= 2)
      bridge_min_density=0.05,  # fix density (share of nearby fix pixels) of a traffic ridge
      bridge_min_heat_fraction=0.7,  # share of a bridge that must see traffic
      trajectory_bridge_max_distance=60.0,  # longest bridge when trajectories decide
      recover=True,             # add heat ridges the image missed (with use_trajectories)
      recover_sigma=4.0,        # Gaussian of fix pixels
      recover_density=0.08,     # fix density of a heat ridge
      recover_cover_radius=3.0,  # ridge pixels this close to predicted road are covered
      recover_min_length=20.0,  # shortest recovered piece (skeleton px)
      recover_max_width=40.0,   # wider ridges are parking lots, not roads
      recover_width=5,          # width a recovered piece is painted with
      block_size=4096,          # skeletonise larger rasters in blocks (0 = whole array)
      block_overlap=128,
  ))

  return presets.apply(config, preset)
