"""TFDS builder of BJRoad (Beijing aerial images + GPS, Sun et al. CVPR 2019)."""
from data_builders.bjroad.bjroad import Bjroad, BjroadConfig

__all__ = ['Bjroad', 'BjroadConfig']
