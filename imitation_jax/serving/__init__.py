"""`imitation-jax serve`: an OpenAI-compatible HTTP API (FastAPI) in front of `Generator`, with
concurrent requests decoded together in batches."""
