"""The job store: templates, jobs and their events, on SQLite or PostgreSQL.

Every change of a job's state goes through :meth:`Store._transition`, in one transaction
with its event, as a compare-and-set on the state the caller saw (and, for a running job,
on the worker that holds it): of two processes racing for one job, exactly one wins.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from tunelab.errors import TunelabError
from tunelab.jobs.db import EventRow, JobRow, TemplateRow, open_engine, utcnow
from tunelab.jobs.states import FINAL, check_transition


class NotFound(TunelabError):
    exit_code = 2


class Store:
    """One job store; safe to use from several processes and machines at once."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = open_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    # -- templates ---------------------------------------------------------------------
    def save_template(
        self,
        name: str,
        config: dict[str, Any],
        source: str | None = None,
        description: str | None = None,
        replace: bool = False,
    ) -> TemplateRow:
        now = utcnow()
        with self._session() as s:
            row = s.scalar(select(TemplateRow).where(TemplateRow.name == name))
            if row is not None and not replace:
                raise TunelabError(
                    f"a template named '{name}' exists already",
                    "choose another name, or pass --replace to overwrite it",
                )
            if row is None:
                row = TemplateRow(name=name, created=now)
                s.add(row)
            row.config, row.source, row.description, row.updated = config, source, description, now
        return row

    def template(self, name: str) -> TemplateRow:
        with self._session() as s:
            row = s.scalar(select(TemplateRow).where(TemplateRow.name == name))
            if row is None:
                names = s.scalars(select(TemplateRow.name).order_by(TemplateRow.name)).all()
                known = f"the templates are: {', '.join(names)}" if names else "there are none yet"
                raise NotFound(f"no template named '{name}'", f"{known} (tunelab template list)")
            return row

    def templates(self) -> list[TemplateRow]:
        with self._session() as s:
            return list(s.scalars(select(TemplateRow).order_by(TemplateRow.name)))

    def delete_template(self, name: str) -> None:
        self.template(name)  # the error names the existing ones
        with self._session() as s:
            s.execute(delete(TemplateRow).where(TemplateRow.name == name))

    # -- jobs ----------------------------------------------------------------------------
    def add_job(self, reason: str = "submitted", **fields: Any) -> JobRow:
        """Queue a new job; ``fields`` are its columns (name, config, run_dir, ...)."""
        job = JobRow(state="queued", created=utcnow(), **fields)
        with self._session() as s:
            s.add(job)
            s.flush()
            s.add(EventRow(job_id=job.id, at=job.created, state="queued", reason=reason))
        return job

    def job_by_request(self, request_id: str) -> JobRow | None:
        with self._session() as s:
            return s.scalar(select(JobRow).where(JobRow.request_id == request_id))

    def name_taken(self, name: str) -> bool:
        with self._session() as s:
            return s.scalar(select(func.count()).where(JobRow.name == name)) > 0

    def job(self, ref: int | str) -> JobRow:
        """A job by id (a number) or by name."""
        with self._session() as s:
            text = str(ref).strip()
            where = JobRow.id == int(text) if text.isdigit() else JobRow.name == text
            job = s.scalar(select(JobRow).where(where))
            if job is None:
                raise NotFound(f"no job {ref}", "tunelab jobs list shows the jobs there are")
            return job

    def jobs(self, states: Sequence[str] | None = None, group: str | None = None) -> list[JobRow]:
        query = select(JobRow).order_by(JobRow.id)
        if states:
            query = query.where(JobRow.state.in_(states))
        if group:
            query = query.where(JobRow.group == group)
        with self._session() as s:
            return list(s.scalars(query))

    def count(self, states: Sequence[str]) -> int:
        """How many jobs are in one of ``states``."""
        with self._session() as s:
            return s.scalar(select(func.count()).where(JobRow.state.in_(states)))

    def groups(self) -> set[str]:
        """The group names sweeps have used."""
        with self._session() as s:
            return set(s.scalars(select(JobRow.group).where(JobRow.group.is_not(None))))

    def queue_order(self) -> list[int]:
        """Queued jobs' ids in the order workers take them."""
        with self._session() as s:
            return list(
                s.scalars(
                    select(JobRow.id)
                    .where(JobRow.state == "queued")
                    .order_by(JobRow.priority.desc(), JobRow.id)
                )
            )

    def events(self, job_id: int) -> list[EventRow]:
        with self._session() as s:
            query = select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id)
            return list(s.scalars(query))

    def delete_job(self, job_id: int) -> None:
        with self._session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.state == "running":
                raise TunelabError(
                    f"job {job_id} is running", f"cancel it first: tunelab jobs cancel {job_id}"
                )
            s.execute(delete(EventRow).where(EventRow.job_id == job_id))
            s.execute(delete(JobRow).where(JobRow.id == job_id))

    # -- state changes -------------------------------------------------------------------
    def _transition(
        self,
        s: Session,
        job_id: int,
        new: str,
        reason: str,
        *,
        expect: Sequence[str],
        by: str | None = None,
        held_by: str | None = None,
        lease_expired: bool = False,
        **fields: Any,
    ) -> JobRow | None:
        """Move the job to ``new`` if it is still in one of ``expect`` (and, with
        ``held_by``, still held by that worker; with ``lease_expired``, its lease still
        expired); record the event. None: someone else changed it first. An illegal change
        is an error."""
        job = s.get(JobRow, job_id, populate_existing=True)
        if job is None:
            raise NotFound(f"no job {job_id}")
        current = job.state
        if current not in expect:  # changed since the caller looked: the caller lost a race
            return None
        check_transition(job_id, current, new)
        now = utcnow()
        values: dict[str, Any] = {"state": new, **fields}
        if new in FINAL:
            values.update(finished=now, lease_until=None, secrets=None)
        if new == "queued":
            values.update(worker=None, pid=None, pid_started=None, lease_until=None, device=None)
        query = update(JobRow).where(JobRow.id == job_id, JobRow.state == current)
        if held_by is not None:
            query = query.where(JobRow.worker == held_by)
        if lease_expired:  # not renewed since the caller looked
            query = query.where(JobRow.lease_until < now)
        if s.execute(query.values(**values)).rowcount != 1:
            return None
        s.add(
            EventRow(
                job_id=job_id,
                at=now,
                from_state=current,
                state=new,
                reason=reason,
                worker=by or held_by,
            )
        )
        s.flush()
        return s.get(JobRow, job_id, populate_existing=True)

    def transition(self, job_id: int, new: str, reason: str, **kw: Any) -> JobRow | None:
        """See :meth:`_transition`; its own transaction."""
        with self._session() as s:
            return self._transition(s, job_id, new, reason, **kw)

    def claim(
        self, worker: str, host: str, device: str, lease: float, job_id: int | None = None
    ) -> JobRow | None:
        """Take the next queued job (or job ``job_id`` if it is queued) for ``worker``."""
        query = select(JobRow.id).where(JobRow.state == "queued")
        if job_id is not None:
            query = query.where(JobRow.id == job_id)
        query = query.order_by(JobRow.priority.desc(), JobRow.id).limit(1)
        with self._session() as s:
            found = s.scalar(query.with_for_update(skip_locked=True))  # SQLite: BEGIN IMMEDIATE
            if found is None:
                return None
            return self._transition(
                s,
                found,
                "running",
                f"taken by worker {worker} on {device}",
                expect=["queued"],
                by=worker,
                worker=worker,
                host=host,
                device=device,
                attempts=JobRow.attempts + 1,
                lease_until=utcnow() + timedelta(seconds=lease),
                started=utcnow(),
                cancel_requested=False,
                exit_code=None,
                error=None,
                hint=None,
            )

    def renew(self, job_id: int, worker: str, lease: float, **fields: Any) -> JobRow | None:
        """Extend the lease ``worker`` holds on a running job (and set ``fields``). None: the
        job is no longer this worker's (it was requeued or ended)."""
        with self._session() as s:
            query = update(JobRow).where(
                JobRow.id == job_id, JobRow.state == "running", JobRow.worker == worker
            )
            until = utcnow() + timedelta(seconds=lease)
            if s.execute(query.values(lease_until=until, **fields)).rowcount != 1:
                return None
            return s.get(JobRow, job_id, populate_existing=True)

    def expired(self, now: datetime | None = None) -> list[JobRow]:
        """Running jobs whose worker stopped renewing their lease."""
        with self._session() as s:
            query = select(JobRow).where(
                JobRow.state == "running", JobRow.lease_until < (now or utcnow())
            )
            return list(s.scalars(query))

    def request_cancel(self, job_id: int, reason: str) -> JobRow:
        """Stop a queued job now; ask the worker of a running one to stop it."""
        with self._session() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.state in FINAL:
                raise TunelabError(f"job {job_id} has ended already ({job.state})")
            if job.state == "queued":
                done = self._transition(s, job_id, "stopped", reason, expect=["queued"])
                if done is not None:
                    return done
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == "running")
                .values(cancel_requested=True)
            )
            s.add(
                EventRow(
                    job_id=job_id,
                    at=utcnow(),
                    from_state="running",
                    state="running",
                    reason=f"{reason}; the worker stops it",
                )
            )
            return s.get(JobRow, job_id, populate_existing=True)

    def note(self, job_id: int, reason: str, worker: str | None = None) -> None:
        """An event that changes no state (a process started, a cancel request)."""
        with self._session() as s:
            state = s.scalar(select(JobRow.state).where(JobRow.id == job_id))
            s.add(
                EventRow(
                    job_id=job_id,
                    at=utcnow(),
                    from_state=state,
                    state=state,
                    reason=reason,
                    worker=worker,
                )
            )
