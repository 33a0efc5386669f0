"""kvship: move LLM KV cache between datacenters."""

__version__ = "0.1.0"
