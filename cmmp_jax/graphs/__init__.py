"""Road graphs from road probability maps: extraction, trajectory-guided completion, outputs.

  extract_graph(probabilities, params, heatmap)   -> networkx.MultiGraph in pixels
  GraphParams                                     every knob, lengths in pixels
  pixel_graph_to_metres / pixel_graph_to_map      for cmmp_jax.topology (metres) and GIS
  graph_to_geojson / write_geojson / write_graphml / read_graphml / render_overlay
  write_graph_outputs(output_dir, stem, probabilities, ...)   what --mode=predict writes

Graph layout: see cmmp_jax.graphs.extract (nodes x, y; edges coords, length, source).
"""
from cmmp_jax.graphs.export import (graph_output_paths, graph_to_geojson, pixel_graph_to_map,
                                    pixel_graph_to_metres, pixel_to_map_coords, read_graphml,
                                    render_overlay, write_geojson, write_graph_outputs,
                                    write_graphml, write_overlay)
from cmmp_jax.graphs.extract import GraphInputError, oriented_coords
from cmmp_jax.graphs.params import GraphParams, GraphParamsError
from cmmp_jax.graphs.pipeline import extract_graph

__all__ = [
    'GraphInputError', 'GraphParams', 'GraphParamsError', 'extract_graph', 'graph_output_paths',
    'graph_to_geojson', 'oriented_coords', 'pixel_graph_to_map', 'pixel_graph_to_metres',
    'pixel_to_map_coords', 'read_graphml', 'render_overlay', 'write_geojson',
    'write_graph_outputs', 'write_graphml', 'write_overlay',
]
