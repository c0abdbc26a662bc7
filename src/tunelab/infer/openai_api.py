"""``tunelab serve-model``: a trained run (or checkpoint), optionally with its base model,
behind the OpenAI chat-completions protocol, streamed or not, so any OpenAI client can
talk to it. One answer at a time: adapters share one base model."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.access import Access
from tunelab.model.generate import Sampling, complete


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


def create_model_app(loaded: Any, default: str, access: Access) -> FastAPI:
    """The chat-completions app over ``loaded`` (see :func:`tunelab.infer.load.load`); a
    request's ``model`` is one of its labels, ``default`` when left out."""
    app = FastAPI(title="tunelab model", docs_url=None, redoc_url=None)
    lock = threading.Lock()

    def guard(request: Request) -> None:
        access.check(request)

    api = [Depends(guard)]

    @app.get("/v1/models", dependencies=api)
    def models() -> dict[str, Any]:
        data = [{"id": label, "object": "model", "created": 0, "owned_by": "tunelab"}
                for label in loaded.labels]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=api)
    def chat(body: ChatRequest):
        label = body.model or default
        if label not in loaded.labels:
            raise HTTPException(404, f"no model '{label}' here: {', '.join(loaded.labels)}")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        sampling = Sampling(body.max_completion_tokens or body.max_tokens or 256,
                            body.temperature, body.top_p, body.seed)  # fmt: skip
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            chunks = _stream(loaded, lock, label, messages, sampling, ident)
            return StreamingResponse(chunks, media_type="text/event-stream")
        with lock, loaded.use(label) as model:
            done = complete(model, loaded.tokenizer, messages, sampling)
        return {
            "id": ident, "object": "chat.completion", "created": int(time.time()),
            "model": label,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": "length" if done.cut_short else "stop"}],
            "usage": {"prompt_tokens": done.prompt_tokens,
                      "completion_tokens": done.completion_tokens,
                      "total_tokens": done.prompt_tokens + done.completion_tokens},
        }  # fmt: skip

    return app


def _chunk(ident: str, label: str, delta: dict[str, Any], finish: str | None = None) -> str:
    record = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
              "model": label,
              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return f"data: {json.dumps(record)}\n\n"


def _stream(
    loaded: Any, lock: threading.Lock, label: str, messages: list[dict[str, str]],
    sampling: Sampling, ident: str,
) -> Iterator[str]:  # fmt: skip
    """OpenAI's stream: a role chunk, content chunks as text is decoded, a finish chunk,
    then ``data: [DONE]``."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}
    stop = threading.Event()

    def run() -> None:
        try:
            with loaded.use(label) as model:
                result["done"] = complete(model, loaded.tokenizer, messages, sampling, streamer,
                                          stop)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported in the stream, then it ends
            result["error"] = exc
            streamer.end()

    with lock:  # held until the generation has ended, even when the reader leaves early
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield _chunk(ident, label, {"role": "assistant", "content": ""})
            first = True
            for text in streamer:
                if first:
                    text, first = text.lstrip(), False  # as the whole answer is stripped
                if text:
                    yield _chunk(ident, label, {"content": text})
        finally:
            stop.set()  # a reader that went away: the answer ends at its next token
            worker.join()
    if "error" in result:
        yield f"data: {json.dumps({'error': {'message': str(result['error'])}})}\n\n"
    else:
        yield _chunk(ident, label, {}, "length" if result["done"].cut_short else "stop")
    yield "data: [DONE]\n\n"
