"""distill-cache: run a teacher once over WebDataset shards into a Zarr cache, train DeiT students from it."""

__version__ = "0.1.0"
