"""Generation state and steps: sequences, sampling, stop strings, the Hugging Face path's engine and KV batch."""
