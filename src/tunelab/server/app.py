"""The REST API over a lab: templates, jobs (with their logs and metrics as server-sent
events that resume from the last event id), runs and checkpoints. Errors are the lists
the CLI prints: 422 with each problem's dotted path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import Depends, FastAPI, Form, Header, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    StreamingResponse,
)
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from tunelab import __version__
from tunelab.access import COOKIE, Access
from tunelab.config import LoadedConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.files import TEMP_PREFIX
from tunelab.jobs.db import JobRow
from tunelab.jobs.lab import LabPaths
from tunelab.jobs.states import FINAL
from tunelab.jobs.store import NotFound, Store
from tunelab.jobs.submit import Submission, given_config, retry, submit
from tunelab.jobs.tasks import add_task
from tunelab.jobs.templates import save_template
from tunelab.jobs.views import (
    checkpoint_rows,
    evaluation_rows,
    job_record,
    run_rows,
    template_record,
)
from tunelab.rundir import RunLayout, read_metrics, whole_lines
from tunelab.server import datasets
from tunelab.server.checks import problem_row, validate_in_subprocess
from tunelab.server.models import ModelProcess, ModelProcesses
from tunelab.server.pages import PageContext, add_pages
from tunelab.server.paths import outside
from tunelab.server.paths import run_folder as run_folder_in

POLL = 0.5  # seconds between looks at a log or metrics file that is still growing


class TemplateIn(BaseModel):
    name: str = Field(description="the template's name")
    config: dict[str, Any] = Field(description="the config, as a mapping of its keys")
    description: str | None = Field(None, description="a line saying what it is for")
    replace: bool = Field(False, description="overwrite a template of that name")


class ChatIn(BaseModel):
    """A conversation to answer with a run (or one of its checkpoints), and with its base
    model too when ``compare`` is set."""

    run: str = Field(description="a run of the lab (its name) or a job (id or name)")
    checkpoint: str | None = Field(None, description="best, last or a step")
    messages: list[dict[str, Any]] = Field(min_length=1)
    compare: bool = False
    stream: bool = False
    which: Literal["tuned", "base"] = Field("tuned", description="the model a stream is from")
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


class TaskIn(BaseModel):
    """An evaluation, merge or export of a run, queued as a job."""

    checkpoint: str | None = Field(None, description="best, last or a step")
    data: str | None = Field(None, description="eval: the file to score")
    comment: str | None = Field(None, description="eval: a note kept with the results")
    base: bool = Field(False, description="eval: score the base model too")
    quant: str = Field("q8_0", description="export: f16, bf16, f32 or q8_0")


class JobIn(BaseModel):
    """One of: ``config`` (a mapping), ``template`` (with ``set``), or ``input`` (a
    RunPod-style request)."""

    config: dict[str, Any] | None = None
    template: str | None = None
    input: dict[str, Any] | None = None
    set: list[str] = Field(default_factory=list, description="KEY=VALUE changes")
    sweep: list[str] = Field(default_factory=list, description="KEY=V1,V2: a job per value")
    name: str | None = None
    priority: int = 0
    max_attempts: int = 3


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab: log in</title></head>
<body><main><h1>tunelab</h1><form method="post" action="/login">
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus>
</label> <button type="submit">Log in</button></form>{message}</main></body></html>"""


def create_app(
    paths: LabPaths, store: Store, access: Access, data_roots: list[Path],
    max_upload: int = 200 << 20, model_idle: float = 600.0,
) -> FastAPI:  # fmt: skip
    """The application for one lab."""
    models = ModelProcesses(paths.logs / "models", model_idle)
    previewer = datasets.Previewer(paths.logs / "preview.log")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def reap() -> None:
            while True:
                await asyncio.sleep(min(5.0, model_idle / 2))
                await models.stop_idle()

        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(models.stop_all)
            await asyncio.to_thread(previewer.close)

    app = FastAPI(title="tunelab", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)  # fmt: skip
    allowed = [paths.datasets, paths.runs, *data_roots]  # never lab.db or secret.key

    def guard(request: Request) -> None:
        access.check(request)

    def check(loaded: LoadedConfig) -> None:
        problems = outside(given_config(loaded), allowed)
        if problems:
            raise ConfigError(problems)
        validate_in_subprocess(loaded)

    @app.exception_handler(TunelabError)
    async def _tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
        if isinstance(exc, ConfigError):
            return JSONResponse({"detail": [problem_row(p) for p in exc.problems]}, 422)
        status = 404 if isinstance(exc, NotFound) else 409
        return JSONResponse({"detail": exc.message, "hint": exc.hint}, status)

    api = [Depends(guard)]

    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> Any:
        bundle = static / "vendor" / "swagger-ui-dist" / "swagger-ui-bundle.js"
        if not bundle.is_file():
            raise HTTPException(503, "the docs page's files are not installed: run make setup "
                                     "(tools/fetch_static.py)")  # fmt: skip
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="tunelab API",
            swagger_js_url="/static/vendor/swagger-ui-dist/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui-dist/swagger-ui.css",
            swagger_favicon_url="data:,",
        )  # fmt: skip

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"tunelab": __version__, "lab": str(paths.root)}

    # -- templates ---------------------------------------------------------------------
    @app.get("/api/templates", dependencies=api)
    def templates() -> list[dict[str, Any]]:
        return [template_record(t) for t in store.templates()]

    @app.post("/api/templates", dependencies=api, status_code=201)
    def create_template(body: TemplateIn) -> dict[str, Any]:
        row = save_template(paths, store, body.name, body.config, check, body.description,
                            body.replace)  # fmt: skip
        return template_record(row)

    @app.get("/api/templates/{name}", dependencies=api)
    def template(name: str) -> dict[str, Any]:
        return template_record(store.template(name))

    @app.put("/api/templates/{name}", dependencies=api)
    def update_template(name: str, body: TemplateIn) -> dict[str, Any]:
        store.template(name)  # 404 for a template that is not there
        row = save_template(paths, store, name, body.config, check, body.description, True)
        return template_record(row)

    @app.delete("/api/templates/{name}", dependencies=api, status_code=204)
    def delete_template(name: str) -> None:
        store.delete_template(name)

    # -- jobs ----------------------------------------------------------------------------
    @app.get("/api/jobs", dependencies=api)
    def jobs(state: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
        order = store.queue_order()
        return [job_record(store, j, order=order) for j in store.jobs([state] if state else None,
                                                                      group)]  # fmt: skip

    @app.post("/api/jobs", dependencies=api, status_code=201)
    def create_job(body: JobIn) -> list[dict[str, Any]]:
        given = [k for k in ("config", "template", "input") if getattr(body, k) is not None]
        if len(given) != 1:
            raise HTTPException(422, "give one of config, template or input (a request)")
        source = {"input": body.input} if body.input is not None else body.config
        sub = Submission(source, body.template, body.set, body.sweep, body.name, body.priority,
                         body.max_attempts)  # fmt: skip
        queued = submit(paths, store, sub, check)
        return [job_record(store, j) for j in queued.jobs]

    @app.get("/api/jobs/{ref}", dependencies=api)
    def job(ref: str) -> dict[str, Any]:
        return job_record(store, store.job(ref), events=True)

    @app.post("/api/jobs/{ref}/cancel", dependencies=api)
    def cancel(ref: str) -> dict[str, Any]:
        row = store.request_cancel(store.job(ref).id, "cancelled through the API")
        return job_record(store, row)

    @app.post("/api/jobs/{ref}/retry", dependencies=api, status_code=201)
    def retry_job(ref: str) -> dict[str, Any]:
        return job_record(store, retry(store, store.job(ref)))

    @app.delete("/api/jobs/{ref}", dependencies=api, status_code=204)
    def delete_job(ref: str) -> None:
        store.delete_job(store.job(ref).id)

    @app.get("/api/jobs/{ref}/logs", dependencies=api, response_class=EventSourceResponse)
    async def logs(
        ref: str, last_event_id: str | None = Header(None)
    ) -> AsyncIterator[ServerSentEvent]:
        row = await run_in_threadpool(store.job, ref)
        async for event in _follow(store, row.id, paths.log(row.id), _offset(last_event_id),
                                   text=True):  # fmt: skip
            yield event

    @app.get("/api/jobs/{ref}/metrics", dependencies=api, response_class=EventSourceResponse)
    async def metrics(
        ref: str, last_event_id: str | None = Header(None)
    ) -> AsyncIterator[ServerSentEvent]:
        row = await run_in_threadpool(store.job, ref)
        metrics_file = RunLayout(Path(row.run_dir)).metrics
        async for event in _follow(store, row.id, metrics_file, _offset(last_event_id),
                                   text=False):  # fmt: skip
            yield event

    # -- logging in (a cookie for pages; programs send the Bearer header) -----------------
    @app.get("/login", response_class=HTMLResponse)
    def login_page() -> str:
        return LOGIN_PAGE.format(message="")

    @app.post("/login")
    def login(request: Request, token: str = Form("")) -> Any:
        access.check_origin(request)
        session = access.open_session(token)
        if session is None:
            page = LOGIN_PAGE.format(message="<p role='alert'>That is not the token.</p>")
            return HTMLResponse(page, status_code=401)
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(COOKIE, session, httponly=True, samesite="strict",
                          secure=request.url.scheme == "https")  # fmt: skip
        return answer

    @app.post("/logout")
    def logout(request: Request) -> Any:
        access.check_origin(request)
        access.sessions.discard(request.cookies.get(COOKIE, ""))
        answer = RedirectResponse("/login", status_code=303)
        answer.delete_cookie(COOKIE)
        return answer

    # -- datasets ------------------------------------------------------------------------
    @app.post("/api/datasets", dependencies=api, status_code=201)
    async def upload(file: UploadFile) -> dict[str, Any]:
        saved = await datasets.save_upload(paths.datasets, file, max_upload)
        return {"name": saved.name, "path": str(saved), "bytes": saved.stat().st_size}

    @app.get("/api/datasets", dependencies=api)
    def dataset_list() -> list[dict[str, Any]]:
        return datasets.listing(paths.datasets)

    @app.get("/api/datasets/{name}/preview", dependencies=api)
    def dataset_preview(
        name: str, base_model: str | None = None, format: str | None = None,
        template: str | None = None, n: int = 3,
    ) -> dict[str, Any]:  # fmt: skip
        path = datasets.find(paths.datasets, name)
        if base_model and outside({"base_model": base_model}, allowed):
            raise ConfigError(outside({"base_model": base_model}, allowed))
        return previewer.preview(path, base_model, format, template, min(max(n, 1), 20))

    # -- chat and generation -------------------------------------------------------------
    def run_of(ref: str) -> Path:
        folder = (paths.runs / ref).resolve()
        if folder.parent == paths.runs.resolve() and folder.is_dir():
            return folder
        return Path(store.job(ref).run_dir)

    @app.post("/api/chat", dependencies=api)
    async def chat(body: ChatIn) -> Any:
        run = await run_in_threadpool(run_of, body.run)
        model = await models.get(run, body.checkpoint)
        async with httpx.AsyncClient(timeout=600, headers=model.headers) as client:
            ids = [m["id"] for m in (await client.get(f"{model.url}/models")).json()["data"]]
        tuned = next(i for i in ids if i != "base")
        request = {"messages": body.messages, "max_tokens": body.max_tokens, "seed": body.seed,
                   "temperature": body.temperature, "top_p": body.top_p}  # fmt: skip
        if body.stream:
            label = tuned if body.which == "tuned" else "base"  # a stream is one answer

            async def relay() -> AsyncIterator[bytes]:
                with model.in_use():
                    async with httpx.AsyncClient(timeout=600, headers=model.headers) as client:
                        async with client.stream("POST", f"{model.url}/chat/completions",
                                                 json={**request, "model": label,
                                                       "stream": True}) as answer:  # fmt: skip
                            if answer.status_code != 200:  # said as a stream says errors
                                error = {"message": f"the model process answered "
                                                    f"{answer.status_code}"}  # fmt: skip
                                yield f"data: {json.dumps({'error': error})}\n\n".encode()
                                return
                            async for chunk in answer.aiter_bytes():
                                yield chunk

            return StreamingResponse(relay(), media_type="text/event-stream")
        with model.in_use():
            answers = await _answers(model, request, tuned, body.compare)
        return {"run": str(run), "checkpoint": body.checkpoint, "model": tuned,
                "answers": answers}  # fmt: skip

    # -- runs ----------------------------------------------------------------------------
    @app.get("/api/runs", dependencies=api)
    def runs() -> list[dict[str, Any]]:
        return run_rows(paths.runs)

    def run_folder(name: str) -> Path:
        return run_folder_in(paths.runs, name)

    @app.get("/api/runs/{name}/checkpoints", dependencies=api)
    def checkpoints(name: str) -> list[dict[str, Any]]:
        return checkpoint_rows(run_folder(name))

    def queue_task(name: str, kind: str, body: TaskIn) -> JobRow:
        run = run_folder(name)
        task = "eval" if kind == "evaluate" else kind
        options: dict[str, Any] = {"checkpoint": body.checkpoint}
        if task == "eval":
            if body.data and outside({"datasets": [{"path": body.data}]}, allowed):
                raise ConfigError(outside({"datasets": [{"path": body.data}]}, allowed))
            options.update(data=body.data, comment=body.comment, base=body.base)
        if task == "export":
            options["quant"] = body.quant
        return add_task(paths, store, task, run, options)

    @app.post("/api/runs/{name}/{kind}", dependencies=api, status_code=201)
    def run_task(name: str, kind: Literal["evaluate", "merge", "export"], body: TaskIn) -> Any:
        return job_record(store, queue_task(name, kind, body))

    @app.get("/api/jobs/{ref}/download", dependencies=api)
    def download(ref: str) -> Any:
        row = store.job(ref)
        if row.kind not in ("merge", "export") or row.state != "completed":
            raise HTTPException(409, f"job {row.id} has nothing to download: only a completed "
                                     "merge or export has")  # fmt: skip
        folder = Path(row.run_dir)
        ggufs = sorted(folder.glob("*.gguf"))
        if row.kind == "export" and ggufs:
            return FileResponse(ggufs[0], filename=ggufs[0].name)
        archive = folder.parent / f"{folder.name}.zip"
        if not archive.exists():  # made once, under a name of its own per request
            stem = folder.parent / f"{TEMP_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
            os.replace(shutil.make_archive(str(stem), "zip", folder), archive)
        return FileResponse(archive, filename=archive.name)

    @app.get("/api/runs/{name}/evaluations", dependencies=api)
    def evaluations(name: str) -> list[dict[str, str]]:
        return evaluation_rows(run_folder(name))

    @app.get("/api/runs/{name}/metrics", dependencies=api)
    def run_metrics(name: str) -> list[dict[str, Any]]:
        return read_metrics(RunLayout(run_folder(name)).metrics)

    app.state.max_upload = max_upload
    add_pages(app, PageContext(paths, store, access, check, allowed, previewer.preview_config,
                               queue_task, TaskIn))  # fmt: skip
    return app


async def _answers(
    model: ModelProcess, request: dict[str, Any], tuned: str, compare: bool
) -> dict[str, Any]:
    """The tuned model's answer, and the base model's beside it with ``compare``."""
    answers: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=600, headers=model.headers) as client:
        for name, label in [("tuned", tuned)] + ([("base", "base")] if compare else []):
            reply = await client.post(f"{model.url}/chat/completions",
                                      json={**request, "model": label})  # fmt: skip
            if reply.status_code != 200:
                raise HTTPException(502, f"the model process answered {reply.status_code}")
            choice = reply.json()["choices"][0]
            answers[name] = {"content": choice["message"]["content"],
                             "finish_reason": choice["finish_reason"]}  # fmt: skip
    return answers


def _offset(last_event_id: str | None) -> int:
    try:
        return max(int(last_event_id or 0), 0)
    except ValueError:
        return 0


async def _follow(
    store: Store, job_id: int, path: Path, offset: int, text: bool
) -> AsyncIterator[ServerSentEvent]:
    """The whole lines of ``path`` from byte ``offset`` on, each event's id the offset after
    it (a client that reconnects with Last-Event-ID gets what it missed); an ``end`` event
    once the job has ended and everything is sent."""
    while True:
        ended = (await run_in_threadpool(store.job, job_id)).state in FINAL
        lines = whole_lines(path, offset)
        for line, offset in lines:
            body = line.decode("utf-8", errors="replace")
            if text:
                yield ServerSentEvent(data=body, event="log", id=str(offset))
            elif body.strip():
                yield ServerSentEvent(data=json.loads(body), event="metrics", id=str(offset))
        if ended and not whole_lines(path, offset):
            yield ServerSentEvent(data={"state": "ended"}, event="end", id=str(offset))
            return
        await asyncio.sleep(POLL)
