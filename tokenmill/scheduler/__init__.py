"""Scheduler: submit (ingest rows, cut chunks) and the dispatch loop (enqueue, expire, finish)."""
