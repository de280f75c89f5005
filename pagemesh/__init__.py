"""pagemesh: an LLM server built around PagedAttention."""

__version__ = "0.1.0"
