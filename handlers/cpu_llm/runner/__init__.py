"""The model runner: our Llama forward pass over a slot KV cache, and the choice, at load, to use it."""
