"""tokenmill: batch inference over JSONL datasets with local quantized LLMs."""

__version__ = "0.1.0"
