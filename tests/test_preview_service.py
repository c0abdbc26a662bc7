"""The server's dataset previews: one long-lived ``tunelab data inspect --serve`` process,
answering as ``tunelab data inspect --json`` would, reused from one preview to the next,
started again when it died and stopped when closed or idle."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.jobs.process import alive
from tunelab.server.checks import run_tunelab
from tunelab.server.datasets import Previewer, inspect_args

ROWS = [
    {"instruction": "What is the capital of Peru?", "input": "", "output": "Lima."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
]
QA = "Q: {{instruction}}\nA: {{output}}"
ARROW = "### {{instruction}} => {{output}}"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preview-data") / "rows.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def previewer(tmp_path_factory):
    shared = Previewer(tmp_path_factory.mktemp("preview-logs") / "preview.log")
    yield shared
    shared.close()


def _text(answer: dict) -> str:
    return "".join(s["text"] for ex in answer["examples"] for s in ex["segments"])


def _until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_previews_with_new_templates_reuse_one_process(previewer, data_file, tiny_model_dir):
    first = previewer.preview(data_file, str(tiny_model_dir), None, QA, 3)
    pid = previewer.pid
    second = previewer.preview(data_file, str(tiny_model_dir), None, ARROW, 3)
    assert "Q: What is the capital of Peru?\nA: Lima." in _text(first)
    assert "### What is the capital of Peru? => Lima." in _text(second)
    assert pid is not None and previewer.pid == pid  # not a fresh process: the same one


def test_the_answer_is_what_the_command_prints(previewer, data_file, tiny_model_dir):
    args = inspect_args(data_file, str(tiny_model_dir), "alpaca", ARROW, 2)
    assert json.loads(previewer.inspect(args)) == json.loads(
        run_tunelab(["data", "inspect", *args])
    )


def test_bad_input_is_the_commands_error_and_the_process_goes_on(
    previewer, data_file, tiny_model_dir
):
    args = inspect_args(data_file, str(tiny_model_dir), None, "Q: {{question}}", 3)
    with pytest.raises(TunelabError) as served:
        previewer.inspect(args)
    with pytest.raises(TunelabError) as command:
        run_tunelab(["data", "inspect", *args])
    assert "question" in served.value.message
    assert type(served.value) is type(command.value) and str(served.value) == str(command.value)
    pid = previewer.pid
    assert "Lima." in _text(previewer.preview(data_file, str(tiny_model_dir), None, QA, 3))
    assert previewer.pid == pid


def test_a_dead_process_is_started_again(previewer, data_file, tiny_model_dir):
    previewer.preview(data_file, str(tiny_model_dir), None, QA, 1)
    killed = previewer.pid
    os.kill(killed, signal.SIGKILL)
    assert _until(lambda: not alive(killed, None))
    answer = previewer.preview(data_file, str(tiny_model_dir), None, ARROW, 3)
    assert "=> Lima." in _text(answer)
    assert previewer.pid not in (None, killed)


def test_the_process_outlives_the_thread_that_started_it(data_file, tiny_model_dir, tmp_path):
    """The server answers from threads that come and go; the kernel's stop-with-parent
    signal follows the thread that started a process, so that thread must stay."""
    previewer = Previewer(tmp_path / "preview.log")
    try:
        asker = threading.Thread(
            target=previewer.preview, args=(data_file, str(tiny_model_dir), None, QA, 1)
        )
        asker.start()
        asker.join()
        pid = previewer.pid
        time.sleep(1.0)  # the signal, were it sent, has been delivered
        assert pid is not None and previewer.pid == pid
    finally:
        previewer.close()
    assert not alive(pid, None)


def test_close_and_idle_leave_no_process(data_file, tiny_model_dir, tmp_path):
    previewer = Previewer(tmp_path / "preview.log", idle=600.0)
    try:
        previewer.preview(data_file, str(tiny_model_dir), None, QA, 1)
        idle = previewer.pid  # read while no idle stop can come, however slow this machine
        assert idle is not None
        previewer.idle = 1.0  # the next answer's end starts a short idle wait
        previewer.preview(data_file, str(tiny_model_dir), None, QA, 1)
        assert _until(lambda: previewer.pid is None and not alive(idle, None))  # stopped
        previewer.idle = 600.0  # from now on only close() may stop it
        previewer.preview(data_file, str(tiny_model_dir), None, QA, 1)  # started again
        closed = previewer.pid
        assert closed not in (None, idle)
    finally:
        previewer.close()
    assert previewer.pid is None and not alive(closed, None)


def test_a_slow_answer_is_given_up(data_file, tiny_model_dir, tmp_path):
    previewer = Previewer(tmp_path / "preview.log", timeout=0.05)
    try:
        with pytest.raises(TunelabError, match="took longer than"):
            previewer.preview(data_file, str(tiny_model_dir), None, QA, 1)
        assert previewer.pid is None
    finally:
        previewer.close()
