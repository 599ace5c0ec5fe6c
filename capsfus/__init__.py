"""capsfus: build CapsFusion-style fused caption datasets at scale."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
