"""Helpers shared by the builder tests: read a built split back, decode a source file."""
import numpy as np
from PIL import Image


def read_split(builder, split):
  """{tile_id: example} of a built split, through tfds' random-access data source."""
  source = builder.as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  return {ex['tile_id'].decode() if isinstance(ex['tile_id'], bytes) else ex['tile_id']: ex
          for ex in examples}


def decoded(path, mode):
  """A source image file as a numpy array in PIL `mode` ('RGB', 'L', ...)."""
  with Image.open(path) as image:
    return np.asarray(image.convert(mode))
