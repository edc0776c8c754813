"""The engines: one `step()` that schedules, runs and records, and `generate()` = step until finished,
for our runner (slot_engine) and the Hugging Face / IPEX path (hf_engine)."""
