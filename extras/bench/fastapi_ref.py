"""The reference server for bench_core.py: the same hash embeddings behind FastAPI + uvicorn,
written the way a typical user would (pydantic request model, a plain dict returned, default
uvicorn settings, one worker), so the benchmark compares the HTTP stacks, not the maths.

The one route exists twice because FastAPI serialises a returned dict in two very different
ways depending on a return annotation that users add or leave out freely:
  /v1/embeddings        no annotation: jsonable_encoder() walks every float in Python, then
                        json.dumps (FastAPI's long-standing default path)
  /typed/v1/embeddings  `-> dict[str, Any]`: FastAPI (>= 0.12x) validates the dict and
                        serialises it straight to JSON bytes in pydantic-core (Rust)

bench_supervisor.py also runs it with `--workers 2`, as the reference for worker restarts.

Run: python -m uvicorn fastapi_ref:app --app-dir extras/bench --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import base64
import os
from array import array
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel

from embedserve.hashing import HashEmbedder

DIMENSIONS = 384

app = FastAPI()
embedder = HashEmbedder(DIMENSIONS)


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/info")
def info() -> dict[str, int]:
    # bench_supervisor.py asks which worker answered, to see a replacement worker serve.
    return {"pid": os.getpid()}


@app.post("/v1/embeddings")
def embeddings(request: EmbeddingRequest):  # noqa: ANN201 - deliberately unannotated, see above
    return openai_response(request)


@app.post("/typed/v1/embeddings")
def typed_embeddings(request: EmbeddingRequest) -> dict[str, Any]:
    return openai_response(request)


def openai_response(request: EmbeddingRequest) -> dict[str, Any]:
    texts = [request.input] if isinstance(request.input, str) else request.input
    vectors = embedder.embed(texts)
    if request.encoding_format == "base64":
        # Native byte order; the bench runs on little-endian machines, as OpenAI's format assumes.
        data: list[Any] = [base64.b64encode(array("f", v).tobytes()).decode("ascii")
                           for v in vectors]
    else:
        data = vectors
    tokens = sum(len(text.split()) for text in texts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": request.model or embedder.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
