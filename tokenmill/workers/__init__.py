"""Worker side: capacity detection, the worker runtime, its Celery task, the entry point (backends: engines/)."""
