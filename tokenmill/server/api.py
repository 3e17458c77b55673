"""The OpenAI-compatible API: Files, Batches, health and metrics, gathered into one router."""

from __future__ import annotations

from fastapi import APIRouter

from tokenmill.server import batches, files, health

router = APIRouter()
router.include_router(files.router)
router.include_router(batches.router)
router.include_router(health.router)
