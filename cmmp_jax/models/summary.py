"""Parameter count and forward FLOPs per image of each model, from XLA's cost analysis.

  python -m cmmp_jax.models.summary [--config=configs/bjroad.py[:presets] --config.a.b=value]
      [--sizes=512,1024] [--models=cmmpnet,image_only,...] [--json=PATH]

FLOPs are XLA's count for the lowered forward pass in eval mode (one image, float32), i.e.
2 x multiply-adds plus elementwise work; a train step costs about 3x that.
"""
from __future__ import annotations

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from cmmp_jax import config_checks
from cmmp_jax.models import MODELS, build_model


def count_params(model, aux_channels: int, size: int = 64) -> int:
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, size, size, aux_channels), jnp.float32))
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes["params"]))


def forward_flops(model, aux_channels: int, size: int) -> float:
  """XLA's FLOP count of one eval-mode forward pass on a (1, size, size, .) input."""
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  aux = jax.ShapeDtypeStruct((1, size, size, aux_channels), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                             image, aux)
  lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, image, aux)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def summarize(model_config: dict, names, sizes) -> list[dict]:
  rows = []
  for name in names:
    model = build_model({**model_config, "name": name})
    row = {"model": name, "params": count_params(model, model_config.get("aux_channels", 1))}
    for size in sizes:
      row[f"gflops_{size}"] = forward_flops(model, model_config.get("aux_channels", 1), size) / 1e9
    rows.append(row)
  return rows


def run(config, models, sizes, json_path: str = "") -> list[dict]:
  """The CLI's work: summarize() of config.model for these model names and input sides, printed
  as a Markdown table (and written to json_path as JSON when given)."""
  model_config = config.model.to_dict()
  rows = summarize(model_config, models, sizes)
  print(f"backbone {model_config['backbone']}, width {model_config['width']}, depths "
        f"{tuple(model_config['depths'])}; forward GFLOPs per image (XLA cost analysis)")
  header = "| model | parameters | " + " | ".join(f"GFLOPs @{s}" for s in sizes) + " |"
  print(header)
  print("|" + "---|" * (2 + len(sizes)))
  for r in rows:
    print(f"| {r['model']} | {r['params']:,} | "
          + " | ".join(f"{r[f'gflops_{s}']:.1f}" for s in sizes) + " |")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def define_flags() -> None:
  """The command line's flags (defined only when this module runs as the program)."""
  config_flags.DEFINE_config_file("config", "configs/bjroad.py", "Config file (with :presets).",
                                  lock_config=True)
  config_checks.define_integer_list("sizes", [512, 1024], "Input sides (square) to count FLOPs at.")
  flags.DEFINE_list("models", list(MODELS), "Model names (config.model.name values).")
  flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")


def main(argv):
  config = config_checks.config_from_flags(argv)
  run(config, flags.FLAGS.models, flags.FLAGS.sizes, flags.FLAGS.json)


if __name__ == "__main__":
  define_flags()
  app.run(main)
