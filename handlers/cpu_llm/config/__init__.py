"""model-config.yaml -> frozen, validated settings; every error names its key."""
