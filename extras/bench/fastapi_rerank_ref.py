"""The reference server for bench_rerank.py: a cross-encoder behind FastAPI + uvicorn, written
the way a user wraps CrossEncoder.predict in a TEI-shaped /rerank endpoint: the model loaded
once at start-up, a plain `def` route (FastAPI runs it in its thread pool, so concurrent
requests call predict concurrently), one predict call per request, default uvicorn settings.

Run: python -m uvicorn fastapi_rerank_ref:app --app-dir extras/bench --port 8000
with $FASTAPI_RERANK_REF_MODEL naming the cross-encoder folder (bench_rerank.py makes one).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import CrossEncoder

model = CrossEncoder(os.environ["FASTAPI_RERANK_REF_MODEL"], device="cpu")
app = FastAPI()


class RerankRequest(BaseModel):
    query: str
    texts: list[str]


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/rerank")
def rerank(request: RerankRequest):  # noqa: ANN201 - unannotated, as users write it
    scores = model.predict([(request.query, text) for text in request.texts])
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return [{"index": i, "score": float(scores[i])} for i in order]
