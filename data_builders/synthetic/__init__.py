"""TFDS builder of the procedural synthetic city (the project's embedded default data set)."""
from data_builders.synthetic.synthetic import Synthetic, SyntheticBuilderConfig

__all__ = ['Synthetic', 'SyntheticBuilderConfig']
