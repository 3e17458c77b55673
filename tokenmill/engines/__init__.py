"""Inference backends behind :class:`tokenmill.engine.Engine`: ``llama`` (llama.cpp) and ``stub`` (no model)."""
