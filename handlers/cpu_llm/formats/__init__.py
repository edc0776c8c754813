"""Tensor formats: int8/int4 quantization and packing, the VNNI tiled layout, scales."""
