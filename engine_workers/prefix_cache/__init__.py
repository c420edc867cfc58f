"""Following this engine's vLLM KV-cache events into the blocks it advertises (plumbing/prefix_cache)."""
