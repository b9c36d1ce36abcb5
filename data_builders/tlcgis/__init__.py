"""TFDS builder of TLCGIS (aerial RGB + lidar depth, Parajuli et al. 2018)."""
from data_builders.tlcgis.tlcgis import Tlcgis

__all__ = ['Tlcgis']
