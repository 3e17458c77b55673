"""Worker side: capacity detection, the worker runtime, its Celery task and the worker entry (engines: tokenmill.engines)."""
