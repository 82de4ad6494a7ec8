"""cscope: dataset-bias analysis with sparse autoencoders on CLIP activations."""

__version__ = "0.1.0"

# Bumped whenever an on-disk format changes; part of every cache key (conceptscope_cli/FORMATS.md).
FORMAT_VERSION = 1
