"""Data: trajectory rendering, geo helpers, synthetic city, augmentation and the grain pipeline."""
