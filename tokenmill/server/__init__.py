"""The HTTP doors into the store: the OpenAI-compatible Files + Batches API and the web dashboard."""
