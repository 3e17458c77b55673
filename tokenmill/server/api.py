"""OpenAI Files + Batches endpoints (placeholder router; the API lands here)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
