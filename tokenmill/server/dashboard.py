"""The web dashboard at ``/`` (placeholder router; the pages land here)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
