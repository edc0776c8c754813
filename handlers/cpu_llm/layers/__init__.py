"""Building blocks of our own models: fused linear layers and attention over the slot KV cache."""
