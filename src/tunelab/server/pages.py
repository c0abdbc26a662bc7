"""The web pages: rendered here from Jinja templates, made live with htmx (parts of a page
fetched again) and a little plain JavaScript (server-sent events, charts, streamed chat).
They call the same store and the same REST API as any other client; nothing here trains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from tunelab.access import Access
from tunelab.config import LoadedConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.jobs.lab import LabPaths
from tunelab.jobs.states import FINAL
from tunelab.jobs.store import Store
from tunelab.jobs.submit import Submission, retry, submit
from tunelab.jobs.tasks import QUANTS
from tunelab.jobs.templates import config_of_run, save_template
from tunelab.jobs.views import checkpoint_rows, evaluation_rows, job_record, run_rows
from tunelab.rundir import RunLayout, describe_run, read_metrics
from tunelab.server import datasets, forms
from tunelab.server.checks import problem_row
from tunelab.server.paths import outside
from tunelab.server.paths import run_folder as run_folder_in

HERE = Path(__file__).parent
STOP_POLLING = 286  # htmx stops polling an element answered with this status


@dataclass
class PageContext:
    paths: LabPaths
    store: Store
    access: Access
    check: Callable[[LoadedConfig], None]
    allowed: list[Path]
    preview: Callable[..., dict[str, Any]]
    queue_task: Callable[[str, str, Any], Any]  # (run name, kind, TaskIn) -> the job
    task_body: type


def _problems(exc: TunelabError) -> list[dict[str, str]]:
    if isinstance(exc, ConfigError):
        return [problem_row(text) for text in exc.problems]
    return [{"path": "", "message": exc.message + (f" ({exc.hint})" if exc.hint else "")}]


def add_pages(app: FastAPI, ctx: PageContext) -> None:
    pages = Jinja2Templates(directory=HERE / "templates")
    paths, store = ctx.paths, ctx.store

    def logged_in(request: Request) -> None:
        """A page asks for the login page where the API would answer 401."""
        try:
            ctx.access.check(request)
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            if request.headers.get("HX-Request"):  # a part of a page: the whole page goes
                raise HTTPException(401, "log in first", headers={"HX-Redirect": "/login"}) \
                    from None  # fmt: skip
            raise HTTPException(303, "log in first", headers={"Location": "/login"}) from None

    page = [Depends(logged_in)]

    def render(request: Request, page_file: str, status: int = 200, **values: Any) -> HTMLResponse:
        values.update(token=ctx.access.token is not None, lab=str(paths.root))
        return pages.TemplateResponse(request, page_file, values, status_code=status)

    def run_name(run_dir: str | Path) -> str | None:
        try:
            return str(Path(run_dir).resolve().relative_to(paths.runs.resolve()))
        except ValueError:
            return None

    def lab_runs() -> list[dict[str, Any]]:
        rows = run_rows(paths.runs)
        for row in rows:
            row["name"] = run_name(row["run"])
        return [r for r in rows if r["name"] and "/" not in r["name"] and r["name"] != "."]

    def run_folder(name: str) -> Path:
        return run_folder_in(paths.runs, name)

    @app.get("/", include_in_schema=False, dependencies=page)
    def home() -> Any:
        return RedirectResponse("/queue", status_code=303)

    # -- queue -------------------------------------------------------------------------
    def queue_rows() -> list[dict[str, Any]]:
        order = store.queue_order()
        return [job_record(store, j, order=order) for j in store.jobs()]

    @app.get("/queue", response_class=HTMLResponse, include_in_schema=False, dependencies=page)
    def queue(request: Request) -> Any:
        return render(request, "queue.html", jobs=queue_rows(), final=FINAL)

    @app.get("/queue/rows", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def queue_part(request: Request) -> Any:
        return render(request, "queue_rows.html", jobs=queue_rows(), final=FINAL)

    # -- a job -------------------------------------------------------------------------
    @app.get("/jobs/{ref}", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def job_page(request: Request, ref: str) -> Any:
        job = job_record(store, store.job(ref), events=True)
        layout = RunLayout(Path(job["run_dir"]))
        return render(request, "job.html", job=job, final=FINAL, run=run_name(job["run_dir"]),
                      tensorboard=str(layout.tensorboard))  # fmt: skip

    @app.get("/jobs/{ref}/status", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def job_status(request: Request, ref: str) -> Any:
        job = job_record(store, store.job(ref), events=True)
        status = STOP_POLLING if job["state"] in FINAL else 200
        return render(request, "job_status.html", status, job=job, final=FINAL,
                      run=run_name(job["run_dir"]))  # fmt: skip

    @app.post("/jobs/{ref}/retry", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    def retry_page(request: Request, ref: str) -> Any:
        try:
            again = retry(store, store.job(ref))
        except TunelabError as exc:
            return render(request, "form_errors.html", problems=_problems(exc),
                          heading="Not retried:")  # fmt: skip
        return Response(status_code=204, headers={"HX-Redirect": f"/jobs/{again.id}"})

    # -- templates -----------------------------------------------------------------------
    @app.get("/templates", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def template_list(request: Request, saved: str | None = None) -> Any:
        return render(request, "templates.html", templates=store.templates(), runs=lab_runs(),
                      saved=saved)  # fmt: skip

    def form_page(request: Request, name: str, config: dict[str, Any], editing: bool,
                  description: str = "") -> HTMLResponse:  # fmt: skip
        return render(
            request, "template_form.html", name=name, editing=editing, description=description,
            sections=forms.form_sections(config), data=forms.data_fields(config),
            other=forms.other_keys(config), uploaded=datasets.listing(paths.datasets),
        )  # fmt: skip

    @app.get("/templates/new", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def new_template(request: Request, from_run: str | None = None) -> Any:
        config: dict[str, Any] = {}
        if from_run:
            text = config_of_run(run_folder(from_run)).read_text(encoding="utf-8")
            config = yaml.safe_load(text) or {}
            config.pop("output_dir", None)
        return form_page(request, "", config, editing=False)

    @app.get("/templates/{name}/edit", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    def edit_template(request: Request, name: str) -> Any:
        row = store.template(name)
        return form_page(request, row.name, row.config, True, row.description or "")

    @app.post("/templates", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    async def save_form(request: Request) -> Any:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        name = form.get("name", "").strip()
        try:
            config = forms.config_from_form(form)
            _uploaded_paths(config, paths)
            row = await _threaded(
                save_template, paths, store, name, config, ctx.check,
                form.get("description") or None, form.get("editing") == "1",
            )  # fmt: skip
        except TunelabError as exc:
            return render(request, "form_errors.html", problems=_problems(exc))
        target = f"/templates?saved={row.name}"
        if form.get("queue") == "1":
            try:
                sub = Submission(None, template=row.name)
                queued = await _threaded(submit, paths, store, sub, ctx.check)
            except TunelabError as exc:  # kept: saving again replaces it
                return render(request, "form_errors.html", problems=_problems(exc), saved=True,
                              heading=f"{row.name} was saved, but not queued:")  # fmt: skip
            target = f"/jobs/{queued.jobs[0].id}"
        return Response(status_code=204, headers={"HX-Redirect": target})

    @app.post("/templates/{name}/queue", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    async def queue_template(request: Request, name: str) -> Any:
        try:
            queued = await _threaded(submit, paths, store, Submission(None, template=name),
                                     ctx.check)  # fmt: skip
        except TunelabError as exc:
            return render(request, "form_errors.html", problems=_problems(exc),
                          heading=f"{name} was not queued:")  # fmt: skip
        return Response(status_code=204, headers={"HX-Redirect": f"/jobs/{queued.jobs[0].id}"})

    preview_turn = asyncio.Lock()  # previews wait here, not in threads, so that one whose
    # page has already asked for a newer one is dropped instead of run

    @app.get("/preview", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    async def preview(request: Request) -> Any:
        form = dict(request.query_params)
        if not (form.get("ds.path") or "").strip():
            return render(request, "preview.html", message="Choose a dataset to see a preview.")
        try:
            config = forms.preview_config(forms.config_from_form(form))
            _uploaded_paths(config, paths)
            problems = outside(config, ctx.allowed)
            if problems:
                raise ConfigError(problems)
            async with preview_turn:
                if await request.is_disconnected():
                    return Response(status_code=204)
                report = await _threaded(ctx.preview, config, 3)
        except TunelabError as exc:
            return render(request, "preview.html", problems=_problems(exc))
        return render(request, "preview.html", report=report)

    @app.post("/datasets", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    async def upload_page(request: Request) -> Any:
        form = await request.form()
        file = form.get("file")
        if file is None or isinstance(file, str) or not file.filename:
            return render(request, "dataset_options.html",
                          uploaded=datasets.listing(paths.datasets), chosen="")  # fmt: skip
        saved = await datasets.save_upload(paths.datasets, file, app.state.max_upload)
        return render(request, "dataset_options.html", uploaded=datasets.listing(paths.datasets),
                      chosen=str(saved))  # fmt: skip

    # -- runs ----------------------------------------------------------------------------
    @app.get("/runs", response_class=HTMLResponse, include_in_schema=False, dependencies=page)
    def runs_page(request: Request) -> Any:
        chosen = [n for n in request.query_params.getlist("compare") if n]
        compared = []
        for name in chosen:
            folder = run_folder(name)
            layout = RunLayout(folder)
            config = yaml.safe_load(layout.config.read_text(encoding="utf-8")) \
                if layout.config.is_file() else {}  # fmt: skip
            compared.append({"name": name, "config": _flat(config or {}),
                             "metrics": read_metrics(layout.metrics)})  # fmt: skip
        return render(request, "runs.html", runs=lab_runs(), compared=compared,
                      diff=_differences([c["config"] for c in compared]))  # fmt: skip

    @app.get("/runs/{name}", response_class=HTMLResponse, include_in_schema=False,
             dependencies=page)  # fmt: skip
    def run_page(request: Request, name: str) -> Any:
        folder = run_folder(name)
        layout = RunLayout(folder)
        tasks = [job_record(store, j) for j in store.jobs()
                 if j.kind != "train" and (j.config or {}).get("run") == str(folder)]  # fmt: skip
        for task in tasks:
            modelfile = Path(task["run_dir"]) / "Modelfile"
            task["modelfile"] = modelfile.read_text(encoding="utf-8") \
                if task["state"] == "completed" and modelfile.is_file() else None  # fmt: skip
        if not layout.status.is_file():
            raise HTTPException(404, f"{name} is not a run (it has no status.json)")
        record = {**describe_run(folder), "name": name}  # this run's record, no other's read
        return render(
            request, "run.html", run=record, checkpoints=checkpoint_rows(folder),
            evaluations=evaluation_rows(folder), tasks=tasks, quants=QUANTS,
            uploaded=datasets.listing(paths.datasets),
            metrics=read_metrics(layout.metrics),
        )  # fmt: skip

    @app.post("/runs/{name}/tasks/{kind}", response_class=HTMLResponse, include_in_schema=False,
              dependencies=page)  # fmt: skip
    async def run_task(request: Request, name: str, kind: str) -> Any:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        try:
            if kind not in ("evaluate", "merge", "export"):
                raise TunelabError(f"no task {kind}", "evaluate, merge or export")
            data = form.get("data", "").strip()
            body = ctx.task_body(
                checkpoint=form.get("checkpoint") or None,
                data=str(_data_path(data, paths, ctx.allowed)) if data else None,
                comment=form.get("comment") or None, base=form.get("base") == "1",
                quant=form.get("quant") or "q8_0",
            )  # fmt: skip
            job = await _threaded(ctx.queue_task, name, kind, body)
        except TunelabError as exc:
            return render(request, "form_errors.html", problems=_problems(exc),
                          heading=f"The {kind} was not queued:")  # fmt: skip
        return Response(status_code=204, headers={"HX-Redirect": f"/jobs/{job.id}"})

    # -- chat ----------------------------------------------------------------------------
    @app.get("/chat", response_class=HTMLResponse, include_in_schema=False, dependencies=page)
    def chat_page(request: Request, run: str | None = None) -> Any:
        finished = [r for r in lab_runs() if r["state"] == "completed"]
        return render(request, "chat.html", runs=finished, chosen=run)


async def _threaded(fn: Callable[..., Any], *args: Any) -> Any:
    from fastapi.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _uploaded_paths(config: dict[str, Any], paths: LabPaths) -> None:
    """A dataset named by an upload's name gets the upload's whole path."""
    for source in config.get("datasets") or []:
        name = str(source.get("path", "/"))
        if "/" not in name and (paths.datasets / name).is_file():
            source["path"] = str(paths.datasets / name)


def _data_path(source: str, paths: LabPaths, allowed: list[Path], key: str = "ds.path") -> Path:
    """An uploaded dataset's name, or a path inside the lab or a data root."""
    candidate = paths.datasets / source
    if "/" not in source and candidate.is_file():
        return candidate
    problems = outside({"datasets": [{"path": source}]}, allowed)
    if problems:
        raise ConfigError([p.replace("datasets.0.path", key) for p in problems])
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError([f"{key}: {source}: no such file"])
    return path


def _flat(value: Any, prefix: str = "") -> dict[str, str]:
    """A config as dotted keys and their values shown as text, for a table of differences."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flat(item, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): forms._shown(value)}


def _differences(configs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Every key of the compared configs, those whose values differ first and marked."""
    keys = sorted({k for c in configs for k in c if k != "output_dir"})  # always differs
    rows = [{"key": k, "values": [c.get(k, "") for c in configs]} for k in keys]
    rows = [r for r in rows if any(r["values"])]  # keys no run set say nothing
    for row in rows:
        row["differs"] = len(set(row["values"])) > 1
    return sorted(rows, key=lambda r: not r["differs"])
