"""The supervision tree: restarting actors by policy, escalating past a restart intensity."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from smsgw.engine.actor import InboxGauge
from smsgw.engine.messages import ChildStatus, SupervisorStatus

logger = logging.getLogger("smsgw.supervisor")

ChildState = Literal["starting", "running", "restarting", "stopped", "failed"]


class Restart(enum.StrEnum):
    """When a child that has ended is started again (Erlang/OTP restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only if it raised; a clean return ends it
    TEMPORARY = "temporary"  # never


@dataclass(frozen=True)
class ChildSpec:
    """One supervised child.

    `run` is called as `await run(task_status=...)` and must call `task_status.started()` once
    it is ready to serve. `inbox` and `stats` only feed `Supervisor.status`.
    """

    name: str
    run: Callable[..., Awaitable[None]]
    restart: Restart = Restart.PERMANENT
    inbox: InboxGauge | None = None
    stats: Callable[[], dict[str, Any]] | None = None


class SupervisorEscalation(Exception):
    """A child failed more often than the restart intensity allows; its last failure is the
    `__cause__`."""

    def __init__(self, supervisor: str, child: str, max_restarts: int, within: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: child {child!r} failed again after "
            f"{max_restarts} restarts within {within:g}s"
        )
        self.supervisor = supervisor
        self.child = child


class ChildKilled(Exception):
    """What a child killed with `Supervisor.kill` failed with (Erlang's `exit(Pid, Reason)`)."""


class _Child:
    """A child's bookkeeping for the life of one supervisor run."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.state: ChildState = "starting"
        self.restarts = 0
        self.last_failure: str | None = None
        self.last_failure_at: float | None = None
        # Cancelled by `shutdown`; covers every attempt and every backoff sleep of this child.
        self.scope = trio.CancelScope()
        # Cancelled by `kill`; covers the current attempt only.
        self.attempt: trio.CancelScope | None = None
        self.killed: str | None = None
        self.supervised = False  # its supervising task is alive
        self.ready = False  # its supervising task has reported started
        self.ended = trio.Event()


class Supervisor:
    """Runs children one_for_one: a failing child is restarted alone, with exponential backoff.

    More than `max_restarts` restarts (over all children) within `within` seconds escalate:
    every child is cancelled and `run` raises `SupervisorEscalation`. A supervisor runs once.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        max_restarts: int = 5,
        within: float = 10.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self.name = name
        self._children = [_Child(spec) for spec in children]
        self._max_restarts = max_restarts
        self._within = within
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._state = "idle"
        self._recent_restarts: deque[float] = deque()  # trio.current_time() of each restart
        self._total_restarts = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, each ready before the next, then report started.

        Returns once every child has ended for good, or after `shutdown`. Raises
        `SupervisorEscalation` (bare, not in an ExceptionGroup) when the restart intensity is
        exceeded, after the other children have been cancelled. On cancellation, all children
        are cancelled and `Cancelled` propagates.
        """
        if self._state != "idle":
            raise RuntimeError(f"supervisor {self.name!r} has already run")
        self._state = "starting"
        try:
            async with trio.open_nursery() as nursery:
                for child in self._children:
                    await nursery.start(self._supervise, child)
                if self._state == "starting":
                    self._state = "running"
                task_status.started()
        except BaseExceptionGroup as group:
            escalations, rest = group.split(SupervisorEscalation)
            if escalations is None or rest is not None:
                raise
            self._state = "failed"
            escalation = _leaves(escalations)[0]
            raise escalation from escalation.__cause__
        self._state = "stopped"

    async def shutdown(self, deadline: float) -> None:
        """Cancel the children, last started first, and return within `deadline` seconds.

        Each child gets an equal share of the time left to finish (shielded cleanup included)
        before the next is cancelled. A child still cleaning up when its share runs out is left
        to finish; `run` returns once it has. No child is restarted after this is called, and
        `run` returns normally. If this is cancelled, the children already cancelled stay so.
        """
        if self._state != "idle":  # shut down before it ran, `run` returns at once
            self._state = "stopping"
        give_up_at = trio.current_time() + deadline
        pending = list(reversed(self._children))
        for index, child in enumerate(pending):
            child.scope.cancel()
            if child.supervised:
                share = (give_up_at - trio.current_time()) / (len(pending) - index)
                with trio.move_on_after(max(share, 0.0)):
                    await child.ended.wait()

    def status(self) -> SupervisorStatus:
        """A snapshot of the supervisor and each child; never raises for a child's `stats`."""
        return SupervisorStatus(
            name=self.name,
            state=self._state,
            max_restarts=self._max_restarts,
            within_seconds=self._within,
            children=[_child_status(child) for child in self._children],
        )

    def kill(self, name: str, reason: str = "killed") -> None:
        """Make the running child `name` fail now with `ChildKilled(reason)`, as if its run
        loop had raised: it is cancelled and then restarted (or not, or escalated) by its
        restart policy like any failure. For operators and tests that check recovery; a child
        that is not running (starting, backing off, stopped) is left alone. Raises KeyError
        for an unknown name."""
        child = next((c for c in self._children if c.spec.name == name), None)
        if child is None:
            raise KeyError(name)
        if child.state == "running" and child.attempt is not None and child.killed is None:
            child.killed = reason
            child.attempt.cancel()

    def restarts(self) -> int:
        """Restarts so far, over all children."""
        return self._total_restarts

    async def _supervise(
        self, child: _Child, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one child going until it ends for good, is shut down, or escalates.

        Reports started once the child is first ready, or once it has ended for good without
        ever being ready, so that starting the supervisor never hangs on one child.
        """
        child.supervised = True
        try:
            with child.scope:
                await self._keep_alive(child, task_status)
        except SupervisorEscalation:
            raise
        except Exception as exc:
            # Only a child that raised while being shut down gets here: `_keep_alive` catches
            # everything else, but not a group that also holds the shutdown's Cancelled.
            self._record_failure(child, _unwrap(exc))
        finally:
            child.supervised = False
            child.ended.set()
        if child.scope.cancel_called:
            child.state = "stopped"
        if not child.ready:
            child.ready = True
            task_status.started()

    async def _keep_alive(self, child: _Child, task_status: trio.TaskStatus[None]) -> None:
        backoff = self._backoff_initial
        while not child.scope.cancel_called:  # shut down before a (re)start: never start it
            child.state = "starting"
            began = trio.current_time()
            failure: Exception | None = None
            child.attempt = trio.CancelScope()
            child.killed = None
            try:
                with child.attempt:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(child.spec.run)
                        child.state = "running"
                        if not child.ready:
                            child.ready = True
                            task_status.started()
            except Exception as exc:
                failure = _unwrap(exc)
                self._record_failure(child, failure)
            finally:
                child.attempt = None
            if failure is None and child.killed is not None:
                failure = ChildKilled(child.killed)
                self._record_failure(child, failure)
            if child.scope.cancel_called:
                return
            if not _restarts(child.spec.restart, failure):
                child.state = "stopped" if failure is None else "failed"
                return
            self._count_restart(child, failure)
            if trio.current_time() - began >= self._within:
                backoff = self._backoff_initial
            child.state = "restarting"
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    def _record_failure(self, child: _Child, failure: BaseException) -> None:
        child.last_failure = _describe(failure)
        child.last_failure_at = time.time()
        logger.warning(
            "supervisor %r: child %r failed: %s",
            self.name,
            child.spec.name,
            child.last_failure,
            exc_info=failure,
        )

    def _count_restart(self, child: _Child, failure: Exception | None) -> None:
        """Count one restart of `child`, or raise `SupervisorEscalation` past the intensity."""
        now = trio.current_time()
        while self._recent_restarts and self._recent_restarts[0] <= now - self._within:
            self._recent_restarts.popleft()
        if len(self._recent_restarts) >= self._max_restarts:
            child.state = "failed"
            logger.error(
                "supervisor %r: child %r exceeded %d restarts within %gs; escalating",
                self.name,
                child.spec.name,
                self._max_restarts,
                self._within,
            )
            raise SupervisorEscalation(
                self.name, child.spec.name, self._max_restarts, self._within
            ) from failure
        self._recent_restarts.append(now)
        self._total_restarts += 1
        child.restarts += 1
        if failure is None:
            logger.warning(
                "supervisor %r: permanent child %r returned; restarting", self.name, child.spec.name
            )


def _restarts(policy: Restart, failure: Exception | None) -> bool:
    if policy is Restart.PERMANENT:
        return True
    if policy is Restart.TRANSIENT:
        return failure is not None
    return False


def _child_status(child: _Child) -> ChildStatus:
    spec = child.spec
    stats: dict[str, Any] = {}
    if spec.stats is not None:
        try:
            stats = spec.stats()
        except Exception as exc:
            stats = {"error": _describe(exc)}
    return ChildStatus(
        name=spec.name,
        state=child.state,
        restart=spec.restart.value,
        restarts=child.restarts,
        last_failure=child.last_failure,
        last_failure_at=child.last_failure_at,
        inbox_depth=spec.inbox.depth if spec.inbox is not None else None,
        inbox_capacity=spec.inbox.capacity if spec.inbox is not None else None,
        stats=stats,
    )


def _unwrap(exc: Exception) -> Exception:
    """The one exception inside nested single-member groups (what a nursery adds), else `exc`."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _leaves(group: BaseExceptionGroup[SupervisorEscalation]) -> list[SupervisorEscalation]:
    found: list[SupervisorEscalation] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
