"""The REST API against a real uvicorn server on 127.0.0.1 (`tunelab serve` in a process of
its own): templates, jobs with their logs as server-sent events, the rules on tokens,
origins and paths, and a server process that never imports torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .jobs_helpers import until, write_config


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, lab: Path, *args: str, env: dict | None = None) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = lab.parent / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "tunelab", "serve", "--lab", str(lab),
             "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),  # noqa: SIM115
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        until(self._up, "the server to answer", timeout=60, proc=self.proc)

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> str:
        """Stop the server; its worker and model processes must end with it."""
        children = _children(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=120)
        until(lambda: not any(_alive(c) for c in children), "the server's children to end",
              timeout=90)  # fmt: skip
        return self.log.read_text()


@pytest.fixture
def data_root(tiny_model_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def server(tmp_path, data_root, tiny_model_dir):
    s = Server(tmp_path / "lab", "--data-root", str(data_root), "--data-root",
               str(tiny_model_dir))  # fmt: skip
    yield s
    s.stop()


def _config(data_root, model_dir, **more) -> dict:
    import yaml

    return yaml.safe_load(write_config(data_root, model_dir, **more).read_text())


def test_templates_over_http_with_the_cli_s_problems_as_422(server, data_root, tiny_model_dir):
    config = _config(data_root, tiny_model_dir)
    made = httpx.post(f"{server.url}/api/templates", json={"name": "t1", "config": config},
                      timeout=120)  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.json()["config"]["datasets"][0]["path"] == str(data_root / "data.json")
    assert [t["name"] for t in httpx.get(f"{server.url}/api/templates").json()] == ["t1"]
    bad = httpx.post(f"{server.url}/api/templates", timeout=120, json={
        "name": "t2", "config": {**config, "learning_rate": "fast", "lora_rr": 8}})  # fmt: skip
    assert bad.status_code == 422
    paths = {p["path"] for p in bad.json()["detail"]}
    assert {"learning_rate", "lora_rr"} <= paths, bad.json()
    assert httpx.get(f"{server.url}/api/templates/nope").status_code == 404
    assert httpx.delete(f"{server.url}/api/templates/t1").status_code == 204
    assert httpx.get(f"{server.url}/api/templates").json() == []


def test_paths_outside_the_lab_and_the_data_roots_are_refused(server, tmp_path, data_root,
                                                              tiny_model_dir):  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside_file = write_config(elsewhere, tiny_model_dir).parent / "data.json"
    (data_root / "link.json").symlink_to(outside_file)
    config = _config(data_root, tiny_model_dir)
    for path in (str(outside_file), str(data_root / ".." / "elsewhere" / "data.json"),
                 str(data_root / "link.json")):  # fmt: skip
        answer = httpx.post(f"{server.url}/api/jobs", timeout=120, json={
            "config": {**config, "datasets": [{"path": path}]}})  # fmt: skip
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert detail[0]["path"] == "datasets.0.path" and path in detail[0]["message"]
    assert httpx.get(f"{server.url}/api/jobs").json() == []


def test_state_changes_need_post_and_the_same_origin(server, data_root, tiny_model_dir):
    assert httpx.get(f"{server.url}/api/jobs/1/cancel").status_code == 405
    answer = httpx.post(f"{server.url}/api/templates", headers={"Origin": "http://evil.example"},
                        json={"name": "x", "config": {}})  # fmt: skip
    assert answer.status_code == 403
    evil = {"Origin": "http://evil.example"}
    for path in ("/templates", "/templates/x/queue", "/datasets", "/runs/x/tasks/merge"):
        posted = httpx.post(f"{server.url}{path}", headers=evil, data={"name": "x"})
        assert posted.status_code == 403, path  # the pages' forms are POST, same origin only
    for path in ("/templates/x/queue", "/datasets", "/runs/x/tasks/merge"):
        assert httpx.get(f"{server.url}{path}").status_code in (404, 405), path
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "tunelab"


def test_a_token_is_required_where_one_is_set_and_off_loopback(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--lab",
                              str(tmp_path / "lab"), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1 and "no token is set" in refused.stderr
    s = Server(tmp_path / "lab", "--no-worker", env={"TUNELAB_TOKEN": "s3cret-token"})
    try:
        assert httpx.get(f"{s.url}/api/jobs").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{s.url}/api/jobs", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(f"{s.url}/api/jobs", headers=right).json() == []
        assert (
            httpx.get(f"{s.url}/api/jobs", cookies={"tunelab_session": "s3cret-token"}).status_code
            == 401
        )  # a cookie holds a session, never the token
    finally:
        s.stop()


def test_a_job_over_http_runs_and_its_log_streams_and_resumes(server, data_root,
                                                              tiny_model_dir):  # fmt: skip
    secrets = {"hf_token": "hf_apisecret_123456", "wandb_api_key": "wandb_apisecret_98765"}
    request = {"user_id": "u1", "model_id": "m1", "run_id": "api-req-1", "credentials": secrets,
               "args": {"base_model": str(tiny_model_dir), "adapter": "lora", "lora_r": 4,
                        "sequence_len": 128, "max_steps": 2, "micro_batch_size": 2,
                        "datasets": [{"path": str(write_config(data_root, tiny_model_dir)
                                                  .parent / "data.json"), "type": "alpaca"}]}}  # fmt: skip
    made = httpx.post(f"{server.url}/api/jobs", json={"input": request}, timeout=120)
    assert made.status_code == 201, made.text
    job = made.json()[0]
    answers = [made.text]
    events = []
    with httpx.stream("GET", f"{server.url}/api/jobs/{job['id']}/logs", timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = {}
        for line in r.iter_lines():
            if not line:
                events.append(event)
                if event.get("event") == "end":
                    break
                event = {}
                continue
            key, _, value = line.partition(": ")
            event[key] = value
    log_events = [e for e in events if e.get("event") == "log"]
    logs = [json.loads(e["data"]) for e in log_events]
    assert any("saved:" in line for line in logs), logs
    cut = len(log_events) // 2  # a page that reconnects after this event
    again = httpx.get(f"{server.url}/api/jobs/{job['id']}/logs", timeout=60,
                      headers={"Last-Event-ID": log_events[cut]["id"]})  # fmt: skip
    rest = [json.loads(line[6:]) for line in again.text.splitlines() if line.startswith("data: ")]
    assert rest[:-1] == logs[cut + 1 :] and rest[-1] == {"state": "ended"}
    final = httpx.get(f"{server.url}/api/jobs/{job['id']}").json()
    assert final["state"] == "completed" and final["result"]["model_id"] == "m1"
    answers += [httpx.get(f"{server.url}/api/jobs/{job['id']}").text,
                httpx.get(f"{server.url}/api/jobs").text]  # fmt: skip
    for page in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/status", "/queue", "/runs",
                 f"/runs/{Path(final['run_dir']).name}", "/chat"):  # fmt: skip
        answers.append(httpx.get(f"{server.url}{page}").text)
        assert answers[-1].startswith("<") or "<p" in answers[-1], page
    for secret in secrets.values():
        assert not any(secret in a for a in answers)
    imported = server.stop()
    assert not [ln for ln in imported.splitlines() if "| torch" in ln or "| transformers" in ln]


def test_serve_model_speaks_openai_chat_completions(trained, tmp_path):
    from tunelab.infer.load import load, resolve_target
    from tunelab.model.generate import Sampling, complete

    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve-model", str(trained.run_dir), "--compare",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:

        def up():
            try:
                return httpx.get(f"{url}/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        until(up, "the model server", timeout=120, proc=proc)
        ids = [m["id"] for m in httpx.get(f"{url}/models").json()["data"]]
        assert ids == ["base", str(trained.run_dir)]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"messages": question, "max_tokens": 12}
        answer = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
        choice = answer["choices"][0]
        assert answer["object"] == "chat.completion" and answer["model"] == str(trained.run_dir)
        assert choice["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] <= 12
        loaded = load([resolve_target(trained.run_dir)], log=lambda _: None)
        expected = complete(loaded.model, loaded.tokenizer, question, Sampling(12))
        assert choice["message"]["content"] == expected.text
        assert choice["finish_reason"] == ("length" if expected.cut_short else "stop")
        base = httpx.post(f"{url}/chat/completions", json={**body, "model": "base"},
                          timeout=120).json()  # fmt: skip
        assert base["model"] == "base"
        lines = []
        with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True},
                          timeout=120) as r:  # fmt: skip
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(ln) for ln in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text.strip() == expected.text
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
        missing = httpx.post(f"{url}/chat/completions", json={**body, "model": "nope"})
        assert missing.status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_uploads_land_in_the_lab_and_are_previewed_with_trained_tokens(server, tmp_path,
                                                                      tiny_model_dir):  # fmt: skip
    rows = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of Peru?",
                                                         "answer": "Lima"}]  # fmt: skip
    sent = httpx.post(f"{server.url}/api/datasets", timeout=60,
                      files={"file": ("../../etc/my data.json", json.dumps(rows))})  # fmt: skip
    assert sent.status_code == 201, sent.text
    stored = Path(sent.json()["path"])
    assert stored.parent == tmp_path / "lab" / "datasets" and stored.name.startswith("my-data-")
    assert json.loads(stored.read_text()) == rows
    assert [d["name"] for d in httpx.get(f"{server.url}/api/datasets").json()] == [stored.name]
    refused = httpx.post(f"{server.url}/api/datasets", files={"file": ("x.exe", b"MZ")})
    assert refused.status_code == 415
    preview = httpx.get(f"{server.url}/api/datasets/{stored.name}/preview", timeout=120, params={
        "base_model": str(tiny_model_dir), "template": "Q: {{question}}\nA: {{answer}}"})  # fmt: skip
    assert preview.status_code == 200, preview.text
    assert "Lima" in json.dumps(preview.json())
    outside = httpx.get(f"{server.url}/api/datasets/{stored.name}/preview",
                        params={"base_model": str(tmp_path / "elsewhere")})  # fmt: skip
    assert outside.status_code == 422
    assert httpx.get(f"{server.url}/api/datasets/..%2Flab.db/preview").status_code == 404


def test_the_login_page_sets_a_strict_httponly_cookie(tmp_path):
    s = Server(tmp_path / "lab", "--no-worker", env={"TUNELAB_TOKEN": "page-token-42"})
    try:
        page = httpx.get(f"{s.url}/login")
        assert page.status_code == 200 and 'type="password"' in page.text
        wrong = httpx.post(f"{s.url}/login", data={"token": "nope"})
        assert wrong.status_code == 401 and "tunelab_session" not in wrong.headers.get(
            "set-cookie", "")  # fmt: skip
        foreign = httpx.post(f"{s.url}/login", data={"token": "page-token-42"},
                             headers={"Origin": "http://evil.example"})  # fmt: skip
        assert foreign.status_code == 403
        right = httpx.post(f"{s.url}/login", data={"token": "page-token-42"})
        assert right.status_code == 303
        cookie = right.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "page-token-42" not in cookie  # a session of its own, not the token
        session = right.cookies["tunelab_session"]
        assert httpx.get(f"{s.url}/api/jobs", cookies={"tunelab_session": session}).json() == []
        assert httpx.post(f"{s.url}/api/templates", cookies={"tunelab_session": session},
                          headers={"Origin": "http://evil.example"}, json={"name": "x",
                          "config": {}}).status_code == 403  # fmt: skip
    finally:
        s.stop()


def test_chat_starts_a_model_process_answers_side_by_side_and_stops_it_when_idle(trained, tmp_path):
    import shutil

    from tunelab.infer.load import load, resolve_target
    from tunelab.model.generate import Sampling, complete

    lab = tmp_path / "lab"
    shutil.copytree(trained.run_dir, lab / "runs" / "memorise")
    s = Server(lab, "--no-worker", "--model-idle", "4")
    try:
        question = [{"role": "user", "content": "Name a colour."}]
        body = {"run": "memorise", "messages": question, "max_tokens": 10, "compare": True}
        answer = httpx.post(f"{s.url}/api/chat", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        answers = answer.json()["answers"]
        loaded = load([resolve_target(lab / "runs" / "memorise")], with_base=True,
                      log=lambda _: None)  # fmt: skip
        for name, label in (("tuned", loaded.labels[-1]), ("base", "base")):
            with loaded.use(label) as model:
                assert answers[name]["content"] == complete(
                    model, loaded.tokenizer, question, Sampling(10)).text  # fmt: skip
        with httpx.stream("POST", f"{s.url}/api/chat", timeout=300,
                          json={**body, "stream": True}) as r:  # fmt: skip
            data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                       for d in data[:-1])  # fmt: skip
        assert data[-1] == "[DONE]" and text.strip() == answers["tuned"]["content"]
        outside = httpx.post(f"{s.url}/api/chat", json={**body, "run": "../.."}, timeout=60)
        assert outside.status_code == 404
        logs = lab / "logs" / "models"
        until(lambda: not any("serve-model" in _cmdline(p) for p in _children(s.proc.pid)),
              "the idle model process to stop", timeout=60)  # fmt: skip
        assert list(logs.glob("model-*.log"))
    finally:
        s.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_evaluation_and_merge_run_as_jobs_with_a_download(trained, tmp_path, data_root):
    import shutil
    import zipfile

    from .conftest import MEMORISE

    lab = tmp_path / "lab"
    shutil.copytree(trained.run_dir, lab / "runs" / "memorise")
    (data_root / "eval.json").write_text(json.dumps(MEMORISE))
    s = Server(lab, "--data-root", str(data_root))
    try:
        url = f"{s.url}/api/runs/memorise"
        refused = httpx.post(f"{url}/evaluate", json={"data": str(tmp_path / "x.json")})
        assert refused.status_code == 422
        ev = httpx.post(f"{url}/evaluate", json={"data": str(data_root / "eval.json"),
                                                 "comment": "held-in", "base": True})  # fmt: skip
        merge = httpx.post(f"{url}/merge", json={"checkpoint": "best"})
        assert ev.status_code == merge.status_code == 201, (ev.text, merge.text)
        early = httpx.get(f"{s.url}/api/jobs/{merge.json()['id']}/download")
        assert early.status_code == 409
        for job in (ev.json(), merge.json()):
            until(lambda j=job: httpx.get(f"{s.url}/api/jobs/{j['id']}").json()["state"]
                  in ("completed", "failed", "stopped"), f"the {job['kind']} job", timeout=300)  # fmt: skip
            done = httpx.get(f"{s.url}/api/jobs/{job['id']}").json()
            assert done["state"] == "completed", done
        rows = httpx.get(f"{url}/evaluations").json()
        assert {r["comment"] for r in rows} == {"held-in"} and len(rows) == 2  # tuned and base
        got = httpx.get(f"{s.url}/api/jobs/{merge.json()['id']}/download", timeout=120)
        assert got.status_code == 200
        archive = tmp_path / "merged.zip"
        archive.write_bytes(got.content)
        names = zipfile.ZipFile(archive).namelist()
        assert "config.json" in names and "model.safetensors" in names
    finally:
        s.stop()


def test_another_sites_name_for_127_0_0_1_is_refused(server):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends its own
    name as Host (and as Origin); without a token only loopback names are answered."""
    rebound = {
        "Host": f"evil.example:{server.port}",
        "Origin": f"http://evil.example:{server.port}",
    }
    assert httpx.get(f"{server.url}/api/jobs", headers=rebound).status_code == 403
    assert httpx.post(f"{server.url}/api/jobs/1/cancel", headers=rebound).status_code == 403
    assert httpx.get(f"{server.url}/api/jobs", headers={"Host": f"localhost:{server.port}"}
                     ).status_code == 200  # fmt: skip


def test_every_key_that_names_a_file_is_confined(server, tmp_path, data_root, tiny_model_dir):
    config = _config(data_root, tiny_model_dir)
    secret = tmp_path / "elsewhere.db"
    secret.write_bytes(b"")
    cases = {
        "datasets.0.path": {"datasets": [{"path": f"sqlite:///{secret}", "query": "SELECT 1"}]},
        "chat_template_jinja": {"chat_template_jinja": str(tmp_path / "t.jinja")},
        "datasets.0.format_file": {"datasets": [{"path": config["datasets"][0]["path"],
                                                 "format_file": str(tmp_path / "f.json")}]},
        "lab.db": {"datasets": [{"path": f"sqlite:///{tmp_path / 'lab' / 'lab.db'}",
                                 "query": "SELECT * FROM jobs"}]},  # the store itself
    }  # fmt: skip
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "f.json").write_text("{}")
    for what, change in cases.items():
        answer = httpx.post(f"{server.url}/api/jobs", json={"config": {**config, **change}},
                            timeout=120)  # fmt: skip
        assert answer.status_code == 422, (what, answer.text)
        assert "outside" in answer.text, (what, answer.text)
    pg = {"datasets": [{"path": "postgresql://u:pw@10.0.0.1/db", "query": "SELECT 1"}]}
    answer = httpx.post(f"{server.url}/api/jobs", json={"config": {**config, **pg}}, timeout=60)
    assert answer.status_code == 422 and "no database" in answer.text and "pw" not in answer.text


def test_the_api_docs_page_loads_nothing_from_elsewhere(server):
    import re

    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    outside = [u for u in re.findall(r"(?:src|href)=['\"]([^'\"]+)", page.text)
               if u.startswith(("http:", "https:", "//"))]  # fmt: skip
    assert outside == []
    for url in re.findall(r"['\"](/static/[^'\"]+)['\"]", page.text):
        assert httpx.get(f"{server.url}{url}").status_code == 200, url


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
