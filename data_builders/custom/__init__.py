"""TFDS builder `custom`: a user's own GeoTIFF + road centerlines + GPS area."""
from data_builders.custom.custom import Custom, CustomConfig, CustomSpec

__all__ = ['Custom', 'CustomConfig', 'CustomSpec']
