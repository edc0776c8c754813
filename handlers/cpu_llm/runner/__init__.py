"""The model runner: our Llama forward over a slot KV cache, and the engine that schedules
decode steps and chunked prefills onto it."""
