"""Quantization: configuration, the IPEX and native backends, SmoothQuant, quantized layers, tensor quantization."""
