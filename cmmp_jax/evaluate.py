"""Evaluation: scoring a state on a split, image panels, and restoring a checkpoint to run it.

`evaluate_split` is what the training loop calls after each epoch; `evaluate` is `--mode=eval`
(a checkpoint of a workdir scored on a split, the result written as JSON);
`restore_for_inference` is shared with prediction.
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np

from cmmp_jax import checkpoint as ckpt_lib
from cmmp_jax import metrics as metrics_lib
from cmmp_jax import config_checks, reporting, sharding, state as state_lib, steps
from cmmp_jax.data import sources


def evaluate_split(eval_step, state, source, config, mesh, *, keep_examples: int = 0,
                   on_probs=None):
  """Runs `eval_step` over every example of `source` once.

  on_probs: optional callable(batch number, global probabilities (G, h, w, 1)) called on every
  process for each batch in order, each one while the next batch's step runs (graph metrics:
  graph_eval.GraphScorer.add).

  Returns:
    (metrics dict of metrics.SegmentationMetrics.compute, examples): up to keep_examples
    (image, aux, prob, label) tuples of host arrays (HWC) for image summaries.
  """
  accumulator = metrics_lib.SegmentationMetrics()
  pending, kept, previous = [], [], None
  for number, local in enumerate(sources.eval_batches(config, source)):
    counts, probs = eval_step(state, sharding.to_global_batch(local, mesh))
    pending.append(counts)
    if sum(int(np.sum(k["valid"])) for k, _ in kept) < keep_examples:
      kept.append((local, probs))
    if on_probs is not None:
      if previous is not None:
        on_probs(*previous)
      previous = (number, probs)
  if previous is not None:
    on_probs(*previous)
  sharding.sync_processes("evaluated")  # the gathers below are collectives: start them together
  examples = []
  for local, probs in kept:
    # Process 0 writes the summaries; its rows come first in the gathered batch.
    probs = np.asarray(sharding.gather(probs))
    for i in range(local["image"].shape[0]):
      if len(examples) < keep_examples and local["valid"][i]:
        examples.append((local["image"][i], local["aux"][i], probs[i], local["mask"][i]))
  for counts in pending:  # one host transfer per batch, after all steps are dispatched
    accumulator.update({k: np.asarray(sharding.gather(v)) for k, v in counts.items()})
  return accumulator.compute(config.eval_batch_size), examples


def summary_panels(examples, scaling: str) -> np.ndarray:
  """(N, H, 4W, 3) uint8 panels: image | aux | prediction | label, at label resolution."""
  panels = []
  for image, aux, prob, label in examples:
    h, w = label.shape[:2]
    unscale = (lambda x: (x + 1.6) / 3.2) if scaling == "reference" else (lambda x: x)
    gray = lambda x: np.repeat(np.clip(x, 0, 1)[..., :1], 3, axis=-1)
    resize = lambda x: cv2.resize(np.asarray(x, np.float32), (w, h),
                                  interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
    row = [np.clip(resize(unscale(image)), 0, 1), gray(resize(unscale(aux))),
           gray(resize(prob)), gray(label)]
    panels.append((np.concatenate(row, axis=1) * 255).round().astype(np.uint8))
  return np.stack(panels)


def restore_for_inference(config, workdir, which=None, mesh=None):
  """(model, state, step, mesh) from workdir's `which` checkpoint ('best', 'latest' or a step;
  default config.eval.checkpoint), the state replicated over `mesh` (default: all devices).

  'best' falls back to the latest, with a console warning, when no best checkpoint was written
  (no evaluation had a defined validation G_IoU) or it is damaged; 'latest' is the newest intact
  step (checkpoint.Checkpoints.restore). Raises checkpoint.CheckpointMismatchError when the
  checkpoint is of another model, checkpoint.CheckpointDamagedError when a step asked for by
  number cannot be read and checkpoint.CheckpointNotFoundError when there is none."""
  which = which if which is not None else config.eval.checkpoint
  mesh = mesh if mesh is not None else sharding.make_mesh()
  model, target = state_lib.abstract_state(config)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, asynchronous=False)
  try:
    step, restored, _ = ckpts.restore(which, target, config.model)
  finally:
    ckpts.close()
  return model, sharding.put_replicated(restored, mesh), step, mesh


def evaluate(config, workdir, split: str | None = None) -> dict:
  """`--mode=eval`: scores config.eval.checkpoint of workdir on `split` (default
  config.eval.split) and writes WORKDIR/eval_<split>_<step>.json.

  With config.eval.graph_metrics, also APLS and TOPO of the road graphs (cmmp_jax.graph_eval):
  tile means in 'apls', 'topo_precision', 'topo_recall', 'topo_f1' (over the tiles with
  ground-truth roads), per-tile records in 'graph_tiles', and where metres per pixel and the
  ground-truth graphs came from."""
  split = split or config.eval.split
  config_checks.check_devices(config, ("eval_batch_size",))  # before restoring and compiling
  model, state, step, mesh = restore_for_inference(config, workdir)
  source = sources.dataset_source(config, split)
  scorer = None
  if config.eval.get("graph_metrics", False):
    from cmmp_jax import graph_eval  # pylint: disable=g-import-not-at-top  (networkx, shapely)
    scorer = graph_eval.GraphScorer(config, split, len(source))
  result, _ = evaluate_split(steps.make_eval_step(model, mesh, tta=config.eval.tta), state,
                             source, config, mesh,
                             on_probs=scorer.add if scorer is not None else None)
  asked = str(config.eval.checkpoint)
  # 'best' falls back to the latest intact step when best/ has no usable one: say which was used.
  used = (asked if asked != "best" or (pathlib.Path(workdir) / "best" / str(step)).is_dir()
          else "latest (no usable best checkpoint)")
  result.update(step=step, split=split, checkpoint=used, tta=bool(config.eval.tta))
  if scorer is not None and sharding.is_primary():
    result.update(scorer.summary())
  path = pathlib.Path(workdir) / f"eval_{split}_{step}.json"
  if sharding.is_primary():
    reporting.write_json(path, result)
  reporting.console(
      f"{split} @ step {step}: G_IoU {result['g_iou']:.4f}  A_IoU {result['a_iou']:.4f}  "
      f"tile-mean IoU {result['mean_tile_iou']:.4f}  P {result['precision']:.4f}  "
      f"R {result['recall']:.4f}  F1 {result['f1']:.4f}  ({result['num_tiles']} tiles) -> {path}")
  if scorer is not None and sharding.is_primary():
    reporting.console(scorer.console_line(result))
  return result
