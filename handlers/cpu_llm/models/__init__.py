"""Our own model definitions (the model runner's forward pass), built from loaded Hugging Face models."""
