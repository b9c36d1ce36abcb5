"""Train, evaluate or predict with CMMPNet.

  python main.py --config=configs/bjroad.py --workdir=/ckpt                  # train (resumes)
  python main.py --config=configs/bjroad.py --workdir=/ckpt --mode=eval      # score a checkpoint
  python main.py --config=configs/bjroad.py --workdir=/ckpt --mode=predict \\
      --config.predict.input_dir=tiles/ --config.predict.output_dir=out/     # road maps

Presets: --config=configs/bjroad.py:image_only (see cmmp_jax/configs.py). Overrides:
--config.model.dtype=bfloat16. Multi-host: pass --jax_distributed (or set
JAX_COORDINATOR_ADDRESS, or give --coordinator_address/--num_processes/--process_id) to call
jax.distributed.initialize().
"""
import os

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (with :presets).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and outputs.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() (multi-host; TPU pods, SLURM, Open MPI and "
                  "Kubernetes are detected, elsewhere give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.xla_flags:  # before JAX starts its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + config.xla_flags).strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=import-outside-toplevel
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.jax_distributed or os.environ.get("JAX_COORDINATOR_ADDRESS") or any(
      x is not None for x in explicit):
    jax.distributed.initialize(*explicit)
  from cmmp_jax import configs, predict, train  # pylint: disable=import-outside-toplevel
  configs.validate(config)
  if FLAGS.mode == "train":
    summary = train.train_and_evaluate(config, FLAGS.workdir)
    if config.data.name == "synthetic" and summary:
      # The embedded demo goes on to score the best checkpoint and predict a few tiles.
      train.evaluate(config, FLAGS.workdir, split=config.data.test_split)
      predict.predict_from_checkpoint(config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    train.evaluate(config, FLAGS.workdir)
  else:
    predict.predict_from_checkpoint(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
