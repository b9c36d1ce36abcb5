"""Tile data sets as Apache Beam pipelines, run by TFDS's own Beam support.

A builder whose `_split_generators` returns `split_transforms(work, tiles_by_split)` is built by
TFDS as one Beam pipeline (TFDS creates it from DownloadConfig.beam_runner / beam_options and
writes the splits with its Beam writer), on any Beam runner: DirectRunner on one machine,
Dataflow, Flink or Spark across many. Nothing here distributes work itself; the runner shares
out the elements below.

The pipeline (one per build; the GPS stage is shared by the splits):

  GPS sources --ReadGps--> ((tile_row, tile_col), points) per chunk and tile, + counts per chunk
     counts  --CombineGlobally--> one GpsCounts --> work.check_gps (raises on bad GPS), metrics
     points  --Partition by split-->  one PCollection per split (points of no split dropped)
  per split: tiles + its points --CoGroupByKey on the tile--> work.example(tile, [points...])
             --> (key, example) for TFDS's writer

so the GPS table is read once, in parallel over its sources, shuffled once (grouped by tile),
and never held whole anywhere; each worker holds one tile's imagery, mask and points at a time.

`work` is the builder's picklable description of the area (it travels to the workers) with:
  gps_sources() -> list            elements to read (e.g. one per GPS file)
  read_gps(source) -> iterator     of GpsCounts (one per chunk) and of
                                   ((tile_row, tile_col), float64 (n, 2) points)
  check_gps(counts) -> None        raises on GPS that cannot be right (run once, on the total)
  example(tile, points) -> (key, example dict, counts)   points: list of the (n, 2) arrays of
                                   the tile; counts {name: int} are added to Beam counters
  tile_cell(tile) -> (tile_row, tile_col)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import apache_beam as beam

from data_builders import streaming

METRICS_NAMESPACE = 'cmmp_jax'


class _MergeGpsCounts(beam.CombineFn):
  """GpsCounts of every chunk -> their total (an empty table gives zero counts)."""

  def create_accumulator(self):
    return streaming.GpsCounts()

  def add_input(self, accumulator, counts):
    return accumulator.merge(counts)

  def merge_accumulators(self, accumulators):
    total = streaming.GpsCounts()
    for counts in accumulators:
      total = total.merge(counts)
    return total

  def extract_output(self, accumulator):
    return accumulator


class _ReadGps(beam.DoFn):
  """One GPS source -> its points by tile (main output) and its counts per chunk ('counts')."""

  def __init__(self, work):
    super().__init__()
    self._work = work

  def process(self, source):
    for item in self._work.read_gps(source):
      if isinstance(item, streaming.GpsCounts):
        yield beam.pvalue.TaggedOutput('counts', item)
      else:
        yield item


def _check_gps(work, counts: streaming.GpsCounts) -> None:
  count('gps_points', counts.points)
  count('gps_on_raster', counts.on_raster)
  work.check_gps(counts)


class _SharedGps:
  """The GPS stage, built once per pipeline however many splits ask for it."""

  def __init__(self, work, cell_to_split: Mapping[tuple[int, int], int], n_splits: int):
    self.work, self.cell_to_split, self.n_splits = work, dict(cell_to_split), n_splits
    self._parts: dict[int, list[beam.PCollection]] = {}

  def parts(self, pipeline: beam.Pipeline) -> list[beam.PCollection]:
    key = id(pipeline)
    if key not in self._parts:
      read = (pipeline
              | 'GpsSources' >> beam.Create(self.work.gps_sources())
              | 'ReadGps' >> beam.ParDo(_ReadGps(self.work)).with_outputs('counts', main='points'))
      _ = (read.counts
           | 'TotalGpsCounts' >> beam.CombineGlobally(_MergeGpsCounts())
           | 'CheckGps' >> beam.Map(lambda counts, work=self.work: _check_gps(work, counts)))
      cell_to_split, dropped = self.cell_to_split, self.n_splits

      def split_of(item, n_parts):
        del n_parts
        return cell_to_split.get(item[0], dropped)

      self._parts[key] = list(read.points | 'GpsBySplit' >> beam.Partition(
          split_of, self.n_splits + 1))
    return self._parts[key]


class _SplitExamples(beam.PTransform):
  """(key, example) of one split's tiles, each with the GPS points of its tile."""

  def __init__(self, shared: _SharedGps, index: int, tiles: Sequence[Any]):
    super().__init__()
    self._shared, self._index, self._tiles = shared, index, list(tiles)

  def expand(self, root):
    work = self._shared.work
    points = self._shared.parts(root.pipeline)[self._index]
    tiles = root | 'Tiles' >> beam.Create([(work.tile_cell(t), t) for t in self._tiles])
    return ({'tile': tiles, 'points': points}
            | 'GroupByTile' >> beam.CoGroupByKey()
            | 'Examples' >> beam.Map(_example, work))


def _example(grouped, work):
  _, parts = grouped
  (tile,) = parts['tile']  # points only reach tiles of this split: Partition above
  key, example, counts = work.example(tile, list(parts['points']))
  for name, value in counts.items():
    count(name, value)
  return key, example


def split_transforms(work, tiles_by_split: Mapping[str, Sequence[Any]]
                     ) -> dict[str, beam.PTransform]:
  """{split name: PTransform of (key, example)} for TFDS's Beam writer (module docstring)."""
  names = list(tiles_by_split)
  cell_to_split = {work.tile_cell(tile): index
                   for index, name in enumerate(names) for tile in tiles_by_split[name]}
  shared = _SharedGps(work, cell_to_split, len(names))
  return {name: _SplitExamples(shared, index, tiles_by_split[name])
          for index, name in enumerate(names)}


def counter_values(pipeline_result, names: Sequence[str]) -> dict[str, int]:
  """The committed totals of this module's counters (0 for one never incremented)."""
  values = dict.fromkeys(names, 0)
  query = pipeline_result.metrics().query(
      beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))
  for result in query['counters']:
    if result.key.metric.name in values:
      values[result.key.metric.name] += result.committed or 0
  return values


def count(name: str, value: int) -> None:
  """Adds value to counter `name` (read back by counter_values after the pipeline)."""
  beam.metrics.Metrics.counter(METRICS_NAMESPACE, name).inc(int(value))
