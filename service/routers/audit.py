"""Audit (concept prevalence with confidence intervals), zero-shot classify, and describe."""
from __future__ import annotations

from typing import Any, List

from fastapi import APIRouter, Depends, Path as PathParam, Query
from pydantic import BaseModel, ConfigDict, Field

import t2c
from t2c import InvalidInput
from t2c.service.deps import PayloadTooLarge, Settings, get_settings, get_store, require_api_key

router = APIRouter(prefix="/api", tags=["audit"], dependencies=[Depends(require_api_key)])
MAX_ID = 2**63 - 1
MAX_TOP = 64


def clean_labels(settings: Settings, labels: list[str], what: str) -> list[str]:
    """Strip, de-duplicate (keeping order) and bound a list of concept texts."""
    out: list[str] = []
    for s in labels:
        if not isinstance(s, str):
            raise InvalidInput(f"each {what} must be a string")
        s = s.strip()
        if not s:
            continue
        if len(s) > settings.max_label_chars:
            raise PayloadTooLarge(f"a {what} is {len(s)} characters long (at most {settings.max_label_chars})",
                                  f"shorten the {what}")
        if s not in out:
            out.append(s)
    if not out:
        raise InvalidInput(f"give at least one {what}", f'e.g. ["red", "circle"]')
    if len(out) > settings.max_concepts:
        raise PayloadTooLarge(f"{len(out)} {what}s given (at most {settings.max_concepts})",
                              "split them over several requests")
    return out


class AuditBody(BaseModel):
    """POST /api/audit body."""

    model_config = ConfigDict(extra="forbid")
    concepts: List[str] = Field(..., description="concept texts, e.g. ['red', 'circle']")
    top: int = Field(8, ge=0, le=MAX_TOP, description="example image ids per concept")


class ClassifyBody(BaseModel):
    """POST /api/classify body."""

    model_config = ConfigDict(extra="forbid")
    labels: List[str] = Field(..., description="class labels, e.g. ['circle', 'square', 'triangle']")
    limit: int = Field(100, ge=0, le=10_000, description="most per-image predictions returned")


def _audit(store: t2c.Store, settings: Settings, concepts: list[str], top: int) -> dict:
    return store.audit(clean_labels(settings, concepts, "concept"), top=top).to_dict()


@router.get("/audit")
def audit_get(concepts: List[str] = Query(..., description="a concept (repeat the parameter for several)"),
              top: int = Query(8, ge=0, le=MAX_TOP), store: t2c.Store = Depends(get_store),
              settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Prevalence of each concept in the collection with a confidence interval and example ids."""
    return _audit(store, settings, concepts, top)


@router.post("/audit")
def audit_post(body: AuditBody, store: t2c.Store = Depends(get_store),
               settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Prevalence of each concept (JSON body form of GET /api/audit)."""
    return _audit(store, settings, body.concepts, body.top)


@router.post("/classify")
def classify(body: ClassifyBody, store: t2c.Store = Depends(get_store),
             settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Zero-shot classification of the collection into the given labels (the store stays read-only)."""
    labels = clean_labels(settings, body.labels, "label")
    if len(labels) < 2:
        raise InvalidInput("give at least two distinct labels to classify between")
    return store.classify(labels).to_dict(limit=body.limit)


@router.get("/describe/{image_id}")
def describe(image_id: int = PathParam(..., ge=0, le=MAX_ID), store: t2c.Store = Depends(get_store)) -> dict[str, Any]:
    """A caption for one image from its concept scores (501 when the store has no caption decoder)."""
    return store.describe(image_id).to_dict()
