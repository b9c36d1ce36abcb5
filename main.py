"""Train, evaluate or predict with CMMPNet.

  python main.py --config=configs/bjroad.py --workdir=/ckpt                  # train (resumes)
  python main.py --config=configs/bjroad.py --workdir=/ckpt --mode=eval      # score a checkpoint
  python main.py --config=configs/bjroad.py --workdir=/ckpt --mode=predict \\
      --config.predict.input_dir=tiles/ --config.predict.output_dir=out/     # road maps

Presets: --config=configs/bjroad.py:image_only (see configs/presets.py). Overrides:
--config.model.dtype=bfloat16. The console shows progress and results; WORKDIR/log.txt has
everything (--verbosity=0 shows library INFO logs on the console too). Multi-host: pass
--jax_distributed (or set JAX_COORDINATOR_ADDRESS, or give --coordinator_address/--num_processes/
--process_id) to call jax.distributed.initialize().

Exit status: 0 done; 143 (128 + SIGTERM) when SIGTERM stopped training after saving its step (rerun
the same command to resume); 1 on an error (one line naming the file or field).
"""
import contextlib
import os
import sys

# TensorFlow (loaded by clu's summary writers) prints C++ banners when it loads; it computes
# nothing here, so its oneDNN kernels (the banner's subject) are not needed either.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cmmp_jax import checkpoint, config_checks, evaluate, predict, reporting, train
from cmmp_jax import workdir as workdir_lib
from cmmp_jax.data import sources

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


# Errors whose message names the file, step or field at fault: the console gets that message, the
# workdir's log the traceback too (it would only bury the message under orbax's frames).
ONE_LINE_ERRORS = (checkpoint.CheckpointMismatchError, checkpoint.CheckpointDamagedError,
                   checkpoint.CheckpointNotFoundError, checkpoint.CheckpointSettingsError,
                   workdir_lib.WorkdirBusyError, train.NonFiniteLossError,
                   sources.DatasetMissingError, sources.DatasetDamagedError,
                   config_checks.ConfigError)


def main(argv):
  config = config_checks.config_from_flags(argv)
  if config.xla_flags:  # read when JAX starts its backends, which nothing has done yet
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + config.xla_flags).strip()
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.jax_distributed or os.environ.get("JAX_COORDINATOR_ADDRESS") or any(
      x is not None for x in explicit):
    jax.distributed.initialize(*explicit)
  with contextlib.ExitStack() as stack:
    try:
      if FLAGS.mode == "train":  # before the log file opens: a refused run writes nothing
        stack.enter_context(workdir_lib.WorkdirLock(FLAGS.workdir, jax.process_index()))
      stack.enter_context(reporting.log_to_workdir(FLAGS.workdir))
      if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
      elif FLAGS.mode == "eval":
        evaluate.evaluate(config, FLAGS.workdir)
      else:
        predict.predict_from_checkpoint(config, FLAGS.workdir)
    except train.PreemptedError as preempted:
      # Saved and stopped early: a non-zero status tells the scheduler to run the job again.
      reporting.console(str(preempted))
      sys.exit(train.PREEMPTED_EXIT_CODE)
    except ONE_LINE_ERRORS as error:
      logging.info("stopped by %s", type(error).__name__, exc_info=True)  # the log file only
      sys.exit(f"error: {error}")


if __name__ == "__main__":
  config_checks.run(main)  # app.run, with bad settings and damaged data shown as one line
