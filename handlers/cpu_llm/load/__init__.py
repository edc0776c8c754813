"""Checkpoint -> served model: the backend choice, the IPEX and native backends, streamed quantization,
calibration, the checkpoint reader and Hugging Face loading."""
