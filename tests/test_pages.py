"""The web pages in a real browser: Debian's Chromium driven by Playwright against
`tunelab serve` on 127.0.0.1, training the tiny model. Each page's screenshot is written to
$TUNELAB_SCREENSHOTS when set (the README's pictures come from there)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import MEMORISE, write_json
from .jobs_helpers import until
from .test_server import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("TUNELAB_TEST_BROWSER") == "required":
            pytest.fail("Chromium is not installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"the page's scripts failed: {errors}"


def shot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path / "screens")
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=False)


@pytest.fixture
def site(tmp_path, tiny_model_dir):
    root = tmp_path / "data"
    root.mkdir()
    write_json(root / "memorise.json", MEMORISE * 4)
    s = Server(tmp_path / "lab", "--data-root", str(root), "--data-root", str(tiny_model_dir))
    s.data = root / "memorise.json"
    yield s
    s.stop()


def fill(page, field: str, value: str) -> None:
    page.locator(f"[name='{field}']").fill(value)


def job_state(site, job_id: int) -> str:
    return httpx.get(f"{site.url}/api/jobs/{job_id}", timeout=30).json()["state"]


def test_build_a_template_queue_it_watch_it_train_and_chat_with_it(site, page, tiny_model_dir,
                                                                   tmp_path):  # fmt: skip
    page.goto(f"{site.url}/templates/new")
    fill(page, "name", "flow")
    fill(page, "description", "the browser test's run")
    fill(page, "base_model", str(tiny_model_dir))
    fill(page, "lora_r", "0")  # refused: the problem is listed and leads to its field
    fill(page, "max_steps", "150")
    fill(page, "learning_rate", "0.01")
    fill(page, "micro_batch_size", "2")
    page.locator("details:has-text('Advanced training settings') summary").click()
    fill(page, "logging_steps", "1")
    fill(page, "eval_steps", "30")
    fill(page, "save_steps", "50")

    page.get_by_role("tab", name="Data").click()
    page.locator("input[type=file]").set_input_files(str(site.data))  # an upload
    page.get_by_role("button", name="Upload", exact=True).click()
    until(lambda: page.locator("[name='ds.path']").input_value().startswith("memorise-"),
          "the uploaded file's name in the dataset field")  # fmt: skip
    fill(page, "sequence_len", "128")
    fill(page, "val_set_size", "2")
    page.locator("#preview .sample mark.trained").first.wait_for(timeout=120_000)
    assert "2 validation samples" in page.locator("#preview").inner_text()  # val_set_size
    outputs = {r["output"] + "<|im_end|>\n" for r in MEMORISE}
    marked = page.locator("#preview .sample mark.trained").all_inner_texts()
    assert marked and set(marked) <= outputs  # the answers are trained, nothing else
    context = " ".join(page.locator("#preview .sample .context").all_inner_texts())
    assert "<|im_start|>user" in context and not any(r["output"] in context for r in MEMORISE)
    # a data template re-renders the preview as it is typed
    fill(page, "ds.data_template", "Q: {{instruction}} {{input}}\nA: {{output}}")
    page.locator("#preview .sample", has_text="Q: ").first.wait_for(timeout=120_000)
    assert "<|im_start|>" not in " ".join(page.locator("#preview .sample").all_inner_texts())
    shot(page, "template-data", tmp_path)
    fill(page, "ds.data_template", "")

    page.get_by_role("button", name="Save and queue").click()
    problem = page.locator("#form-errors [data-field='lora_r']")
    problem.wait_for(timeout=120_000)
    problem.click()
    assert page.locator("#f-lora_r").evaluate("e => e === document.activeElement")
    page.get_by_role("tab", name="Settings").click()
    shot(page, "template-form", tmp_path)
    fill(page, "lora_r", "4")
    page.get_by_role("button", name="Save and queue").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"), timeout=180_000)
    job_id = int(page.url.rsplit("/", 1)[1])

    # the chart grows while the job runs; a reload mid-run loses nothing
    chart = page.locator("#chart")
    until(lambda: int(chart.get_attribute("data-points")) >= 5, "the chart to show 5 steps",
          timeout=180)  # fmt: skip
    before = int(chart.get_attribute("data-points"))
    until(lambda: int(chart.get_attribute("data-points")) > before, "the chart to grow")
    assert job_state(site, job_id) == "running"
    lines = int(page.locator("#log").get_attribute("data-lines"))
    points = int(chart.get_attribute("data-points"))
    shot(page, "job", tmp_path)
    page.reload()
    until(lambda: int(page.locator("#chart").get_attribute("data-points")) >= points,
          "the reloaded chart to show every step again")  # fmt: skip
    until(lambda: int(page.locator("#log").get_attribute("data-lines")) >= lines,
          "the reloaded log to show every line again")  # fmt: skip
    page.locator("#job-state", has_text="completed").wait_for(timeout=240_000)
    page.locator("#chart[data-ended='1']").wait_for(timeout=30_000)
    metrics = httpx.get(f"{site.url}/api/runs/flow-1/metrics", timeout=30).json()
    steps = {r["step"] for r in metrics}
    assert int(page.locator("#chart").get_attribute("data-points")) == len(steps)
    assert "saved:" in page.locator("#log").inner_text()

    # the queue shows it done; the runs page overlays it with a second run and their config
    # differences
    page.goto(f"{site.url}/queue")
    row = page.locator(f"tr[data-job='{job_id}']")
    assert row.get_attribute("data-state") == "completed"
    second = httpx.post(f"{site.url}/api/jobs", timeout=180, json={
        "template": "flow", "set": ["learning_rate=0.003", "max_steps=20"]}).json()[0]  # fmt: skip
    page.locator(f"tr[data-job='{second['id']}']").wait_for(timeout=30_000)
    shot(page, "queue", tmp_path)
    until(lambda: job_state(site, second["id"]) == "completed", "the second job to finish")
    page.goto(f"{site.url}/runs")
    page.get_by_label("compare flow-1").check()
    page.get_by_label(f"compare {Path(second['run_dir']).name}").check()
    page.get_by_role("button", name="Compare the checked runs").click()
    differs = page.locator("table.diff tr.differs")
    assert {"learning_rate", "max_steps"} <= set(
        differs.locator("td:first-child").all_inner_texts()
    )
    assert int(page.locator("#overlay").get_attribute("data-points")) == len(steps)
    shot(page, "runs", tmp_path)

    # chat with the result, its base model beside it: what the page shows is what the API
    # answers for the same conversation
    page.goto(f"{site.url}/chat?run=flow-1")
    page.get_by_label("compare with the base model").check()
    page.locator("#chat-message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    tuned = page.locator("#chat-tuned .message.assistant:not(.streaming)")
    base = page.locator("#chat-base .message.assistant:not(.streaming)")
    tuned.wait_for(timeout=240_000)
    base.wait_for(timeout=240_000)
    shot(page, "chat", tmp_path)
    expected = httpx.post(f"{site.url}/api/chat", timeout=300, json={
        "run": "flow-1", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "compare": True, "max_tokens": 200}).json()["answers"]  # fmt: skip
    assert tuned.inner_text() == expected["tuned"]["content"].strip()
    assert base.inner_text() == expected["base"]["content"].strip()


def finished_download(page) -> str:
    """On the job page a run page's button led to: wait for the job to complete, download
    its result; the file's name."""
    page.wait_for_url(re.compile(r"/jobs/\d+$"), timeout=60_000)
    page.locator("#job-state", has_text="completed").wait_for(timeout=240_000)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    return download.value.suggested_filename


def test_the_run_page_evaluates_merges_and_exports_as_jobs_with_a_download(trained, smol_tiny_run,
                                                                          tmp_path, page):  # fmt: skip
    lab = tmp_path / "lab"
    shutil.copytree(trained.run_dir, lab / "runs" / "memorised")
    # a run whose tokenizer llama.cpp's converter knows (SmolLM2's), for the GGUF export
    shutil.copytree(smol_tiny_run.run_dir, lab / "runs" / "smol")
    (tmp_path / "data").mkdir()
    data = write_json(tmp_path / "data" / "eval.json", MEMORISE)
    site = Server(lab, "--data-root", str(data.parent))
    try:
        page.goto(f"{site.url}/runs/memorised")
        kept = httpx.get(f"{site.url}/api/runs/memorised/checkpoints", timeout=30).json()
        rows = page.locator("#checkpoints tbody tr")
        assert [int(t) for t in rows.locator("td:first-child").all_inner_texts()] == [
            c["step"] for c in kept]  # fmt: skip
        assert rows.filter(has_text="best").count() == 1
        page.locator("input[name=data]").fill(str(data))
        page.locator("input[name=comment]").fill("from the page")
        page.get_by_role("button", name="Evaluate perplexity").click()
        page.wait_for_url(re.compile(r"/jobs/\d+$"), timeout=60_000)
        page.locator("#job-state", has_text="completed").wait_for(timeout=240_000)
        page.goto(f"{site.url}/runs/memorised")
        assert page.locator("table.evals td", has_text="from the page").count() == 1
        page.get_by_role("button", name="Merge into a full model").click()
        assert finished_download(page).endswith(".zip")
        page.goto(f"{site.url}/runs/memorised")
        shot(page, "run", tmp_path)
        page.goto(f"{site.url}/runs/smol")
        page.get_by_label("GGUF quantization").select_option("f16")
        page.get_by_role("button", name="Export GGUF").click()
        assert finished_download(page).endswith(".gguf")
        page.goto(f"{site.url}/runs/smol")
        page.locator("summary", has_text="Modelfile").click()
        assert "FROM " in page.locator("details pre").inner_text()  # Ollama's Modelfile
    finally:
        site.stop()


def test_pages_ask_for_the_token_and_log_in_with_it(tmp_path, page):
    site = Server(tmp_path / "lab", "--token", "page-token-123", "--no-worker")
    try:
        page.goto(f"{site.url}/queue")
        assert page.url.endswith("/login")
        page.locator("input[name=token]").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        assert "not the token" in page.locator("[role=alert]").inner_text()
        page.locator("input[name=token]").fill("page-token-123")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r"/queue$"))
        assert page.locator("h1").inner_text() == "Queue"
        assert "page-token-123" not in page.content()
        page.context.clear_cookies()  # as after a restart of the server: the queue's next
        page.wait_for_url(re.compile(r"/login$"), timeout=30_000)  # refresh asks to log in
        page.locator("input[name=token]").fill("page-token-123")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r"/queue$"))
        page.get_by_role("button", name="Log out").click()
        page.goto(f"{site.url}/templates")
        assert page.url.endswith("/login")
    finally:
        site.stop()


@pytest.fixture
def idle_site(tmp_path, tiny_model_dir):
    """A server with no worker (jobs wait in the queue) and a config for the tiny model."""
    from .jobs_helpers import write_config

    root = tmp_path / "data"
    root.mkdir()
    s = Server(tmp_path / "lab", "--no-worker", "--data-root", str(root), "--data-root",
               str(tiny_model_dir))  # fmt: skip
    s.config = yaml.safe_load(write_config(root, tiny_model_dir).read_text())
    s.data = root / "data.json"
    yield s
    s.stop()


def test_the_queue_page_cancels_retries_and_removes(idle_site, page):
    site, config = idle_site, idle_site.config
    made = httpx.post(f"{site.url}/api/jobs", timeout=180,
                      json={"config": config, "sweep": ["lora_r=4,8"]}).json()  # fmt: skip
    first, second = (j["id"] for j in made)
    page.goto(f"{site.url}/queue")
    row = page.locator(f"tr[data-job='{second}']")
    assert row.locator("td").nth(4).inner_text() == "2"  # its place in the queue
    row.get_by_role("button", name="Cancel").click()
    page.locator(f"tr[data-job='{second}'][data-state='stopped']").wait_for(timeout=30_000)
    page.locator(f"tr[data-job='{second}']").get_by_role("button", name="Retry").click()
    page.locator("tr[data-state='queued']").nth(1).wait_for(timeout=30_000)
    page.locator(f"tr[data-job='{second}']").get_by_role("button", name="Remove").click()
    page.locator(f"tr[data-job='{second}']").wait_for(state="detached", timeout=30_000)
    states = {j["id"]: j["state"] for j in httpx.get(f"{site.url}/api/jobs").json()}
    assert second not in states and states[first] == "queued"
    assert sorted(states.values()) == ["queued", "queued"]


def test_a_failed_job_s_page_shows_the_error_and_its_hint(idle_site, page, tmp_path):
    from .jobs_helpers import start_worker

    site, config, lab = idle_site, idle_site.config, tmp_path / "lab"
    job = httpx.post(f"{site.url}/api/jobs", json={"config": config}, timeout=180).json()[0]
    page.goto(f"{site.url}/jobs/{job['id']}")
    assert "position 1 in the queue" in page.locator("#job-status").inner_text()
    site.data.unlink()  # gone before a worker takes the job
    worker = start_worker(lab, "--drain")
    assert worker.wait(timeout=300) == 0
    alert = page.locator("#job-status [role=alert]")
    alert.wait_for(timeout=30_000)
    record = httpx.get(f"{site.url}/api/jobs/{job['id']}").json()
    assert record["state"] == "failed" and record["error"] and record["hint"]
    assert record["error"] in alert.inner_text() and record["hint"] in alert.inner_text()
    assert page.locator("#job-state").inner_text() == "failed"
    page.get_by_role("button", name="Retry").wait_for()


def test_editing_a_template_in_the_form_keeps_what_the_form_does_not_change(idle_site, page,
                                                                          tmp_path):  # fmt: skip
    config = {**idle_site.config, "lora_target_modules": ["q_proj", "v_proj"],
              "learning_rate": 1e-5, "bf16": False, "gradient_accumulation_steps": 2}  # fmt: skip
    config["datasets"] = [{**config["datasets"][0], "type": "alpaca", "field": None}]
    config["datasets"][0].pop("field")
    made = httpx.post(f"{idle_site.url}/api/templates", timeout=180,
                      json={"name": "kept", "config": config, "description": "before"})  # fmt: skip
    assert made.status_code == 201, made.text
    before = made.json()["config"]
    page.goto(f"{idle_site.url}/templates")
    shot(page, "templates", tmp_path)
    page.get_by_role("link", name="kept").click()
    assert page.locator("[name=lora_target_modules]").input_value() == "[q_proj, v_proj]"
    fill(page, "lora_r", "8")
    fill(page, "description", "after")
    page.get_by_role("button", name="Save", exact=True).click()
    page.wait_for_url(re.compile(r"/templates\?saved=kept$"), timeout=180_000)
    after = httpx.get(f"{idle_site.url}/api/templates/kept").json()
    assert after["description"] == "after"
    assert after["config"] == {**before, "lora_r": 8}


def test_the_preview_reads_and_writes_nothing_outside_the_lab(idle_site, tmp_path):
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the content of a file outside the lab")
    base = {"ds.path": str(idle_site.data), "base_model": idle_site.config["base_model"]}
    for key, value in [("ds.path", str(secret)), ("chat_template_jinja", str(secret)),
                       ("ds.format_file", str(secret)), ("base_model", str(secret.parent))]:  # fmt: skip
        answer = httpx.get(f"{idle_site.url}/preview", params={**base, key: value}, timeout=60)
        assert answer.status_code == 200 and "outside the lab" in answer.text, key
        assert "the content of a file" not in answer.text
    cache = tmp_path / "elsewhere" / "cache"
    answer = httpx.get(f"{idle_site.url}/preview", timeout=180,
                       params={**base, "dataset_prepared_path": str(cache)})  # fmt: skip
    assert "sample" in answer.text and not cache.exists()  # previewed; nothing written there
