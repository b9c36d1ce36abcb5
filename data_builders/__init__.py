"""TFDS builders of the road data sets (synthetic city, BJRoad, Porto, TLCGIS, custom tiles).

Build one with `python -m data_builders.build NAME --data_dir DIR` (see data_builders/build.py);
the builders are imported lazily by name there, so a missing optional builder breaks no other.
"""
