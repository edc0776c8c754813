"""Building blocks of the served models: quantized and full-precision linear layers, fused linears, attention over the slot KV cache."""
