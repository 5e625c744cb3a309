"""Data: sources, local formats, tokenisation, packing."""
