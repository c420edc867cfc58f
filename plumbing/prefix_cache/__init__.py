"""The global prefix-cache index in Redis, shared by routers and engines: block hashes, held blocks."""
