"""TFDS builder of the Porto aerial image + taxi GPS heat-map data set."""
from data_builders.porto.porto import Porto

__all__ = ['Porto']
