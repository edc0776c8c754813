"""The ground floor: errors, protocol-neutral request parameters, memory and progress utilities.
Imports nothing else of cpu_llm."""
