"""Audit (concept prevalence with confidence intervals), zero-shot classify, and describe.

Each feature lives in its own ``query`` module; when that module is not part of this build the route
answers 501 with a clear message instead of failing.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, List

from fastapi import APIRouter, Depends, Path as PathParam, Query
from pydantic import BaseModel, ConfigDict, Field

from t2c.data.errors import InvalidInput, NotFound
from t2c.service.deps import Live, NotAvailable, PayloadTooLarge, Settings, get_live, get_settings, require_api_key

router = APIRouter(prefix="/api", tags=["audit"], dependencies=[Depends(require_api_key)])
MAX_ID = 2**63 - 1
MAX_TOP = 64


def feature(module: str, func: str):
    """``query.<module>.<func>``, or a 501 error when that module is not available."""
    name = f"t2c.query.{module}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise NotAvailable(f"{module} is not available in this build ({name} is missing)",
                           "update t2c to a version that includes it") from None
    fn = getattr(mod, func, None)
    if fn is None:
        raise NotAvailable(f"{module} is not available in this build ({name}.{func} is missing)",
                           "update t2c to a version that includes it")
    return fn


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


def _audit(live: Live, settings: Settings, concepts: list[str], top: int) -> dict:
    fn = feature("audit", "audit")
    concepts = clean_labels(settings, concepts, "concept")
    report = fn(live.snapshot, concepts, top=top)
    out = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    out.setdefault("snapshot", live.name)
    return out


@router.get("/audit")
def audit_get(concepts: List[str] = Query(..., description="a concept (repeat the parameter for several)"),
              top: int = Query(8, ge=0, le=MAX_TOP), live: Live = Depends(get_live),
              settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Prevalence of each concept in the collection with a confidence interval and example ids."""
    return _audit(live, settings, concepts, top)


@router.post("/audit")
def audit_post(body: AuditBody, live: Live = Depends(get_live),
               settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Prevalence of each concept (JSON body form of GET /api/audit)."""
    return _audit(live, settings, body.concepts, body.top)


@router.post("/classify")
def classify(body: ClassifyBody, live: Live = Depends(get_live),
             settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    """Zero-shot classification of the collection into the given labels."""
    fn = feature("classify", "classify")
    labels = clean_labels(settings, body.labels, "label")
    if len(labels) < 2:
        raise InvalidInput("give at least two distinct labels to classify between")
    kw = {"write": False} if "write" in inspect.signature(fn).parameters else {}  # the store stays read-only
    out = dict(fn(live.snapshot, labels, **kw))
    preds = out.get("predictions")
    if isinstance(preds, list) and len(preds) > body.limit:
        out["predictions"] = preds[: body.limit]
        out["predictions_truncated"] = True
    out.setdefault("snapshot", live.name)
    return out


@router.get("/describe/{image_id}")
def describe(image_id: int = PathParam(..., ge=0, le=MAX_ID), live: Live = Depends(get_live)) -> dict[str, Any]:
    """A caption for one image from its concept scores."""
    fn = feature("describe", "describe")
    live.snapshot.rows_of([image_id])  # NotFound for unknown ids, before any work
    try:
        out = dict(fn(live.snapshot, image_id))
    except NotFound as e:  # the id exists, so what is missing is a caption decoder for this CLIP space
        raise NotAvailable(f"describe is not available for this store: {e.message}", e.hint) from None
    out.setdefault("id", image_id)
    return out
