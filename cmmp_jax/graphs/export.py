"""Road graph outputs: map / metre coordinates, GeoJSON, GraphML, PNG overlay, predict's files.

Coordinates. A pixel graph (cmmp_jax.graphs.extract) places node (x, y) at the centre of pixel
(row=y, col=x); the raster's affine transform maps continuous pixel coordinates (col, row), with
(0, 0) the north-west corner of pixel (0, 0) (rasterio's convention, cmmp_jax.data.geo), so a
graph vertex (x, y) lies at transform * (x + 0.5, y + 0.5) in the raster's CRS.

Files (each written atomically: a temporary file in the same folder, then os.replace):
  {stem}_graph.geojson  FeatureCollection of LineStrings, one per edge, in the raster's CRS
                        (a legacy "crs" member names it when it is not WGS84), or WGS84 lon/lat
                        with wgs84=True, or pixel (col, row) coordinates without georeference
                        (then "crs" is absent and "coordinate_units" says "pixel").
  {stem}_graph.graphml  the pixel graph: node x, y (and map_x, map_y with a georeference); edge
                        geometry (WKT LINESTRING in pixels), length (pixels), source; graph crs
                        (WKT, '' without), transform (a, b, c, d, e, f) and the extraction
                        counts. `read_graphml` restores the networkx graph with coords arrays.
  {stem}_overlay.png    the image (or the probability map in grey) with the graph drawn on it:
                        image edges red, bridges yellow, trajectory bridges cyan, junctions
                        white, dead ends blue.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Any, Mapping

import affine
import cv2
import networkx as nx
import numpy as np
import rasterio.crs
import rasterio.warp
import shapely

from cmmp_jax.data import geo as geo_lib
from cmmp_jax.graphs import extract
from cmmp_jax.graphs.params import GraphParams

WGS84 = rasterio.crs.CRS.from_epsg(4326)
EDGE_COLOURS = {'image': (255, 0, 0), 'bridge': (255, 220, 0), 'trajectory_bridge': (0, 230, 255)}
JUNCTION_COLOUR = (255, 255, 255)
END_COLOUR = (40, 90, 255)


# ----------------------------------------------------------------------------------------------
# Coordinates.


def _map_graph(graph: nx.MultiGraph, function) -> nx.MultiGraph:
  """A copy with every node position and polyline vertex passed through function((N, 2))."""
  out = graph.copy()
  for node, data in out.nodes(data=True):
    (data['x'], data['y']), = function(np.array([[data['x'], data['y']]], np.float64)).tolist()
  for _, _, data in out.edges(data=True):
    data['coords'] = function(np.asarray(data['coords'], np.float64))
    data['length'] = extract.polyline_length(data['coords'])
  return out


def pixel_to_map_coords(xy: np.ndarray, transform: affine.Affine) -> np.ndarray:
  """(N, 2) pixel-graph (x, y) -> (N, 2) map coordinates: transform * (x + 0.5, y + 0.5)."""
  cols, rows = xy[:, 0] + 0.5, xy[:, 1] + 0.5
  a, b, c, d, e, f = tuple(transform)[:6]
  return np.column_stack([a * cols + b * rows + c, d * cols + e * rows + f])


def pixel_graph_to_map(graph: nx.MultiGraph, transform: affine.Affine) -> nx.MultiGraph:
  """Pixel graph -> the same graph in the raster's CRS (x, y, coords, length in CRS units)."""
  out = _map_graph(graph, lambda xy: pixel_to_map_coords(xy, transform))
  out.graph['units'] = 'crs'
  return out


def pixel_graph_to_metres(graph: nx.MultiGraph, metres_per_pixel: float) -> nx.MultiGraph:
  """Pixel graph -> the same graph in metres (x, y scaled; y still grows downwards), the input
  of cmmp_jax.topology's APLS / TOPO."""
  if not np.isfinite(metres_per_pixel) or metres_per_pixel <= 0:
    raise ValueError(f'metres_per_pixel must be > 0, got {metres_per_pixel}')
  out = _map_graph(graph, lambda xy: xy * float(metres_per_pixel))
  out.graph['units'] = 'metre'
  return out


# ----------------------------------------------------------------------------------------------
# GeoJSON.


def _edges_in_order(graph: nx.MultiGraph):
  return sorted(graph.edges(keys=True, data=True), key=lambda e: (e[0], e[1], e[2]))


def graph_to_geojson(graph: nx.MultiGraph, geo=None, *, wgs84: bool = False) -> dict[str, Any]:
  """Pixel graph -> GeoJSON FeatureCollection dict (see the module docstring for coordinates).

  Args:
    graph: a pixel graph (extract_graph).
    geo: cmmp_jax.data.geo.GeoInfo of the raster (crs may be None: then coordinates are in the
      transform's units and no CRS is named), or None for pixel coordinates.
    wgs84: reproject to EPSG:4326 lon/lat (needs geo with a CRS).
  """
  if wgs84 and (geo is None or geo.crs is None):
    raise ValueError('wgs84 GeoJSON needs a georeferenced input (a CRS and transform)')
  edges = _edges_in_order(graph)
  chunks = [np.asarray(d['coords'], np.float64) for _, _, _, d in edges]
  flat = np.concatenate(chunks) if chunks else np.zeros((0, 2))
  collection: dict[str, Any] = {'type': 'FeatureCollection'}
  if geo is None:
    collection['coordinate_units'] = 'pixel'
  else:
    flat = pixel_to_map_coords(flat, geo.transform)
    crs = geo.crs
    if wgs84 and crs != WGS84 and len(flat):
      xs, ys = rasterio.warp.transform(crs, WGS84, flat[:, 0].tolist(), flat[:, 1].tolist())
      flat = np.column_stack([xs, ys])
    if wgs84 or crs == WGS84:
      collection['coordinate_units'] = 'degree'
    elif crs is not None:
      epsg = crs.to_epsg()
      collection['crs'] = {'type': 'name', 'properties': {
          'name': f'urn:ogc:def:crs:EPSG::{epsg}' if epsg else crs.to_wkt()}}
      collection['coordinate_units'] = 'crs'
    else:
      collection['coordinate_units'] = 'transform'
  features = []
  offset = 0
  for (u, v, key, data), chunk in zip(edges, chunks):
    points = flat[offset:offset + len(chunk)]
    offset += len(chunk)
    features.append({
        'type': 'Feature',
        'geometry': {'type': 'LineString', 'coordinates': points.tolist()},
        'properties': {'u': int(u), 'v': int(v), 'key': int(key),
                       'length_px': float(data['length']), 'source': str(data['source'])}})
  collection['features'] = features
  return collection


# ----------------------------------------------------------------------------------------------
# GraphML.


def _graphml_ready(graph: nx.MultiGraph, geo=None) -> nx.MultiGraph:
  """A copy whose attributes GraphML can hold: polylines as WKT, scalars only."""
  out = nx.MultiGraph()
  for name, value in graph.graph.items():
    if isinstance(value, (bool, int, float, str)):
      out.graph[name] = value
  out.graph['crs'] = geo.crs.to_wkt() if geo is not None and geo.crs is not None else ''
  out.graph['transform'] = (','.join(repr(float(t)) for t in tuple(geo.transform)[:6])
                            if geo is not None else '')
  for node, data in graph.nodes(data=True):
    attrs = {'x': float(data['x']), 'y': float(data['y'])}
    if geo is not None:
      (attrs['map_x'], attrs['map_y']), = pixel_to_map_coords(
          np.array([[data['x'], data['y']]]), geo.transform).tolist()
    out.add_node(int(node), **attrs)
  for u, v, key, data in _edges_in_order(graph):
    coords = np.asarray(data['coords'], np.float64)
    out.add_edge(int(u), int(v), key=int(key),
                 geometry=shapely.to_wkt(shapely.LineString(coords), rounding_precision=-1),
                 length=float(data['length']), source=str(data['source']))
  return out


def read_graphml(path) -> nx.MultiGraph:
  """Reads a {stem}_graph.graphml back into a pixel graph (int nodes, coords arrays)."""
  raw = nx.read_graphml(path, node_type=int, force_multigraph=True)
  out = nx.MultiGraph()
  out.graph.update(raw.graph)
  for node, data in raw.nodes(data=True):
    out.add_node(node, **data)
  for u, v, key, data in raw.edges(keys=True, data=True):
    data = dict(data)
    data['coords'] = shapely.get_coordinates(shapely.from_wkt(data.pop('geometry')))
    data.pop('id', None)
    out.add_edge(u, v, key=int(key), **data)
  return out


# ----------------------------------------------------------------------------------------------
# Overlay.


def render_overlay(graph: nx.MultiGraph, background: np.ndarray) -> np.ndarray:
  """Draws a pixel graph on a uint8 (H, W, 3) RGB image, or on a float (H, W) probability map
  (shown in grey); returns uint8 (H, W, 3) RGB."""
  background = np.asarray(background)
  if background.ndim == 2 or (background.ndim == 3 and background.shape[2] == 1):
    grey = background.reshape(background.shape[:2])
    if np.issubdtype(grey.dtype, np.floating):
      grey = np.rint(np.clip(grey, 0, 1) * 255)
    canvas = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
  elif background.ndim == 3 and background.shape[2] >= 3:
    rgb = background[..., :3]
    if np.issubdtype(rgb.dtype, np.floating):  # float images in [0, 1]
      rgb = np.rint(np.clip(rgb, 0, 1) * 255)
    canvas = np.ascontiguousarray(rgb).astype(np.uint8)
  else:
    raise ValueError(f'overlay background must be (H, W) or (H, W, 3), got {background.shape}')
  height, width = canvas.shape[:2]
  thickness = max(1, int(round(min(height, width) / 512)))
  shift = 4  # sub-pixel vertices: cv2 takes fixed-point coordinates scaled by 2**shift
  for _, _, data in graph.edges(data=True):
    points = np.rint(np.asarray(data['coords']) * (1 << shift)).astype(np.int32)
    colour = EDGE_COLOURS.get(data.get('source', 'image'), EDGE_COLOURS['image'])
    cv2.polylines(canvas, [points.reshape(-1, 1, 2)], False, colour, thickness, cv2.LINE_AA,
                  shift)
  for node, data in graph.nodes(data=True):
    degree = graph.degree(node)
    if degree == 2:
      continue
    centre = (int(round(data['x'] * (1 << shift))), int(round(data['y'] * (1 << shift))))
    colour = JUNCTION_COLOUR if degree >= 3 else END_COLOUR
    cv2.circle(canvas, centre, (thickness + 2) << shift, colour, -1, cv2.LINE_AA, shift)
  return canvas


# ----------------------------------------------------------------------------------------------
# Writing.


def write_geojson(path, graph: nx.MultiGraph, geo=None, *, wgs84: bool = False) -> None:
  geo_lib.write_bytes_atomic(path, json.dumps(graph_to_geojson(graph, geo, wgs84=wgs84)).encode())


def write_graphml(path, graph: nx.MultiGraph, geo=None) -> None:
  buffer = io.BytesIO()
  nx.write_graphml(_graphml_ready(graph, geo), buffer)
  geo_lib.write_bytes_atomic(path, buffer.getvalue())


def write_overlay(path, graph: nx.MultiGraph, background: np.ndarray) -> None:
  rgb = render_overlay(graph, background)
  ok, encoded = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  if not ok:
    raise OSError(f'{path}: PNG encoding failed')
  geo_lib.write_bytes_atomic(path, encoded.tobytes())


def graph_output_paths(output_dir, stem: str) -> dict[str, pathlib.Path]:
  output_dir = pathlib.Path(output_dir)
  return {'geojson': output_dir / f'{stem}_graph.geojson',
          'graphml': output_dir / f'{stem}_graph.graphml',
          'overlay': output_dir / f'{stem}_overlay.png'}


def write_graph_outputs(output_dir, stem: str, probabilities, *, image=None, heatmap=None,
                        geo=None, config: Mapping[str, Any] | None = None,
                        ) -> tuple[list[pathlib.Path], nx.MultiGraph]:
  """Extracts the road graph of one prediction and writes its three files (module docstring).

  Args:
    output_dir, stem: files go to output_dir/{stem}_graph.geojson etc.
    probabilities: (H, W) float probability map (a tile or a stitched mosaic).
    image: optional uint8 (H, W, 3) RGB image for the overlay (else, or when its size
      differs, the probability map).
    heatmap: optional (H, W) GPS heat-map, used when config.use_trajectories; resized
      (bilinear) to the probability map when its size differs (a model run at another scale).
    geo: cmmp_jax.data.geo.GeoInfo of the input, or None (pixel coordinates).
    config: `config.graph` (GraphParams fields plus 'wgs84'); None = defaults.

  Returns:
    (paths written in order geojson, graphml, overlay; the pixel graph).
  """
  from cmmp_jax.graphs.pipeline import extract_graph  # pipeline imports this module's peers

  config = dict(config.items()) if config is not None else {}
  params = GraphParams.from_config(config)
  probabilities = np.asarray(probabilities)
  size = probabilities.shape[:2]
  if heatmap is not None and params.use_trajectories:
    heatmap = np.asarray(heatmap)
    if heatmap.shape[:2] != size:
      heatmap = cv2.resize(heatmap.astype(np.float32) / (255.0 if heatmap.dtype == np.uint8
                                                         else 1.0), size[::-1],
                           interpolation=cv2.INTER_LINEAR)
  if image is not None and np.asarray(image).shape[:2] != size:
    image = None
  graph = extract_graph(probabilities, params, heatmap=heatmap)
  paths = graph_output_paths(output_dir, stem)
  wgs84 = bool(config.get('wgs84', False)) and geo is not None and geo.crs is not None
  write_geojson(paths['geojson'], graph, geo, wgs84=wgs84)
  write_graphml(paths['graphml'], graph, geo)
  write_overlay(paths['overlay'], graph, image if image is not None else probabilities)
  return list(paths.values()), graph
