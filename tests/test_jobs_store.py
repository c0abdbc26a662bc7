"""The job store on SQLite and on a real PostgreSQL server: migrations, the one transition
function and its rules, atomic claims, leases, and rows that survive a SIGKILL."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from tunelab.errors import TunelabError
from tunelab.jobs.db import utcnow
from tunelab.jobs.states import IllegalTransition
from tunelab.jobs.store import Store

from .jobs_helpers import start_worker


def _job(store, name="j", **more):
    return store.add_job(name=name, config={"base_model": "x"}, run_dir=f"/runs/{name}", **more)


def test_a_new_store_is_migrated_to_the_newest_schema(store_url):
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from tunelab.jobs.db import MIGRATIONS

    store = Store(store_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables = set(store.engine.dialect.get_table_names(conn))
    assert current == ScriptDirectory.from_config(config).get_current_head()
    assert {"templates", "jobs", "job_events", "alembic_version"} <= tables
    store.close()
    Store(store_url).close()  # opening again changes nothing


def test_a_store_from_a_newer_version_is_refused(store_url):
    store = Store(store_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with pytest.raises(TunelabError, match="newer tunelab"):
        Store(store_url)


def test_every_change_of_state_is_an_event_and_a_finished_job_stays_finished(store_url):
    store = Store(store_url)
    job = _job(store)
    with pytest.raises(IllegalTransition, match="cannot go from queued to completed"):
        store.transition(job.id, "completed", "skipping ahead", expect=["queued"])
    claimed = store.claim("w1", "host", "cpu", lease=30)
    assert claimed.id == job.id and claimed.state == "running" and claimed.worker == "w1"
    assert claimed.attempts == 1
    # another worker cannot end a job it does not hold
    assert store.transition(job.id, "completed", "done", expect=["running"], held_by="w2") is None
    done = store.transition(job.id, "completed", "done", expect=["running"], held_by="w1")
    assert done.state == "completed" and done.finished is not None and done.lease_until is None
    with pytest.raises(IllegalTransition, match="never changes state again"):
        store.transition(job.id, "queued", "again", expect=["completed"])
    with pytest.raises(TunelabError, match="has ended already"):
        store.request_cancel(job.id, "too late")
    events = [(e.from_state, e.state, e.reason) for e in store.events(job.id)]
    assert events == [
        (None, "queued", "submitted"),
        ("queued", "running", "taken by worker w1 on cpu"),
        ("running", "completed", "done"),
    ]
    assert all(e.at is not None and e.at.tzinfo is not None for e in store.events(job.id))


def test_cancel_stops_a_queued_job_and_asks_a_running_one(store_url):
    store = Store(store_url)
    first, second = _job(store, "a"), _job(store, "b")
    assert store.request_cancel(first.id, "cancelled by the user").state == "stopped"
    running = store.claim("w1", "h", "cpu", lease=30)
    assert running.id == second.id
    asked = store.request_cancel(second.id, "cancelled by the user")
    assert asked.state == "running" and asked.cancel_requested
    assert store.renew(second.id, "w1", 30).cancel_requested


def test_the_queue_takes_priority_then_age(store_url):
    store = Store(store_url)
    low, high, later_high = (
        _job(store, "low"),
        _job(store, "high", priority=5),
        _job(store, "later", priority=5),
    )
    assert store.queue_order() == [high.id, later_high.id, low.id]
    assert [store.claim("w", "h", "cpu", 30).id for _ in range(3)] == [
        high.id, later_high.id, low.id,
    ]  # fmt: skip
    assert store.claim("w", "h", "cpu", 30) is None


def test_a_lease_is_renewed_only_by_its_holder_and_requeued_only_when_expired(store_url):
    store = Store(store_url)
    job = _job(store)
    store.claim("w1", "h", "cpu", lease=30)
    assert store.renew(job.id, "w2", 30) is None
    assert store.expired() == []
    # not expired: a requeue that insists on an expired lease loses
    assert store.transition(job.id, "queued", "gone?", expect=["running"], held_by="w1",
                            lease_expired=True) is None  # fmt: skip
    later = utcnow() + timedelta(seconds=60)
    assert [j.id for j in store.expired(later)] == [job.id]
    store.renew(job.id, "w1", lease=-1)  # its worker stopped renewing: already due
    back = store.transition(job.id, "queued", "worker w1 stopped renewing its lease",
                            expect=["running"], held_by="w1", by="w2", lease_expired=True)  # fmt: skip
    assert back.state == "queued" and back.worker is None and back.attempts == 1
    assert store.renew(job.id, "w1", 30) is None  # the old worker learns it lost the job
    assert store.claim("w2", "h", "cpu", 30).attempts == 2


def _claim_all(url, worker, out):
    store = Store(url)
    got = []
    while (job := store.claim(worker, "h", "cpu", lease=30)) is not None:
        got.append(job.id)
    store.close()
    out.put(got)


def test_racing_workers_claim_each_job_exactly_once(store_url):
    store = Store(store_url)
    ids = {_job(store, f"j{i}").id for i in range(40)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(store_url, f"w{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    flat = [j for got in claimed for j in got]
    assert sorted(flat) == sorted(ids)  # all taken, none twice
    assert all(len([e for e in store.events(i) if e.state == "running"]) == 1 for i in ids)


HAMMER = textwrap.dedent("""
    import sys
    from tunelab.jobs.store import Store
    store = Store(sys.argv[1])
    job = store.add_job(name="busy", config={"x": "y" * 2000}, run_dir=sys.argv[2])
    store.claim("w1", "h", "cpu", 2)
    print("ready", flush=True)
    n = 0
    while True:
        store.renew(job.id, "w1", 2, error="e" * (n % 3000))
        store.note(job.id, f"heartbeat {n}", "w1")
        n += 1
""")


def test_a_worker_killed_while_writing_leaves_no_damaged_row(store_url, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HAMMER, store_url, str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # let it write, then kill it in the middle of a write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(store_url)
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    job = store.job("busy")
    assert job.state == "running" and job.config == {"x": "y" * 2000}
    assert len(store.events(job.id)) > 10
    # a real worker finds the lease expired, requeues the job, then runs it (its config
    # is no config, so that run fails at once: what matters is who took it back)
    env = {} if store_url.startswith("sqlite") else {"TUNELAB_DB": store_url}
    worker = start_worker(tmp_path, "--drain", env=env)
    assert worker.wait(timeout=120) == 0
    events = [(e.from_state, e.state, e.reason) for e in store.events(job.id)]
    requeued = [e for e in events if e[:2] == ("running", "queued")]
    assert len(requeued) == 1 and "worker w1 stopped renewing its lease" in requeued[0][2]
    assert store.job("busy").state == "failed" and store.job("busy").attempts == 2


def test_templates_are_kept_by_name(store_url):
    store = Store(store_url)
    store.save_template("base", {"base_model": "a"}, "/cfg.yaml", "first")
    with pytest.raises(TunelabError, match="exists already"):
        store.save_template("base", {"base_model": "b"})
    store.save_template("base", {"base_model": "b"}, replace=True)
    assert store.template("base").config == {"base_model": "b"}
    with pytest.raises(TunelabError, match="the templates are: base"):
        store.template("bsae")
    store.delete_template("base")
    assert store.templates() == []


def test_a_database_url_that_cannot_be_reached_is_a_clear_error(closed_port):
    with pytest.raises(TunelabError) as info:
        Store(f"postgresql://someone:hunter2@127.0.0.1:{closed_port}/lab")
    assert "cannot open the job store" in info.value.message
    assert "hunter2" not in str(info.value)
    with pytest.raises(TunelabError, match="SQLite or PostgreSQL"):
        Store("mysql://u@h/db")
