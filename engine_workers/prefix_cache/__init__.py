"""Which prefix blocks each engine holds: block hashing, vLLM KV events, the Redis index."""
