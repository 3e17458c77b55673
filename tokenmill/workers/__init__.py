"""Worker side: capacity detection, the llama.cpp engine, the Celery task and the worker runtime."""
