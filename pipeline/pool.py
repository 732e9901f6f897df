"""The driver's view of its worker actors: which take work, which are being probed, and replacements.

A worker whose call fails with RayActorError gets no work until a `describe` probe answers: Ray
restarts a killed actor (`max_restarts`), and the restarted actor is used again. A probe that Ray
answers with ActorUnavailableError (a restart under way, or the process out of reach for a moment) is
sent again after a backoff (BACKOFF_S, doubling up to BACKOFF_MAX_S); ActorDiedError (its restarts
used up) or no answer within PROBE_S gives the worker up: it is killed, and a new actor takes its slot
while `spare` allows (a new actor too gets work only once its first probe answers). Probes never
block the driver's loop, so a lost node (whose actors cannot be placed again while the other nodes'
GPUs are taken) costs no time. Calls to an actor that Ray lists as RESTARTING or DEAD may never
return (with Ray 2.60, after a node was lost), so every HEALTH_S the driver reads Ray's actor table;
and while no worker takes work it asks whether any Ray node is alive at all (a killed raylet takes an
embedded cluster's only node: new actors would wait for ever).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HEALTH_S = 5.0  # how often the driver asks Ray's actor table whether busy actors are still alive
PROBE_S = 120.0  # a worker that does not answer within this long (a restart re-imports torch) is given up
BACKOFF_S = 0.5  # first wait before probing again a worker that Ray calls temporarily unavailable
BACKOFF_MAX_S = 8.0  # longest such wait
_OOM = re.compile(r"low on memory|memory pressure|memory usage threshold|OutOfMemory", re.IGNORECASE)


class WorkerLost(Exception):
    """Ray's actor table lists a busy worker as not alive (its node died, or it is restarting)."""


def death_error(err: BaseException, times: int) -> str:
    """The error recorded for a job whose worker died `times` times running it; OOM named as such."""
    if _OOM.search(f"{type(err).__name__} {err}"):
        return f"OutOfMemory: Ray killed the worker for lack of memory {times} times running this job"
    return f"WorkerDied: the worker died {times} times running this job ({type(err).__name__})"


@dataclass(frozen=True)
class _Probe:
    worker: int
    deadline: float  # time.monotonic() after which the worker is given up
    wait_s: float = BACKOFF_S  # backoff before the next probe, if this one finds it unavailable


class WorkerPool:
    """Worker actors by slot; `spawn` starts a new one for a slot given up, at most `spare` times."""

    def __init__(self, actors: Sequence[Any], spawn: Callable[[], Any] | None = None, spare: int = 0) -> None:
        self.actors = list(actors)
        self.alive = [True] * len(self.actors)
        self.spawn, self.spare = spawn, spare
        self.spawned: list[Any] = []  # actors this pool started; `close` kills them
        self.probes: dict[Any, _Probe] = {}  # describe() call -> its probe
        self.waiting: list[tuple[float, _Probe]] = []  # (time.monotonic() to send it, probe)
        self.next_health = self.next_nodes = time.monotonic() + HEALTH_S

    def usable(self) -> bool:
        """Whether any worker takes work now or may again (alive, probed, or waiting to be probed)."""
        return any(self.alive) or bool(self.probes) or bool(self.waiting)

    def lose(self, worker: int) -> None:
        """Stop feeding `worker` and probe it to learn when Ray has restarted it."""
        if self.alive[worker]:
            self.alive[worker] = False
            self._send(_Probe(worker, time.monotonic() + PROBE_S))

    def settle_probe(self, ref: Any) -> None:
        """A probe answered: the worker is back, unavailable for now (probe again later), or gone."""
        import ray

        probe = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            retry_at = time.monotonic() + probe.wait_s
            if retry_at < probe.deadline:
                later = dataclasses.replace(probe, wait_s=min(2 * probe.wait_s, BACKOFF_MAX_S))
                self.waiting.append((retry_at, later))
            else:
                self._give_up(probe.worker, f"still unavailable after {PROBE_S:.0f} s")
            return
        except ray.exceptions.RayError as err:
            self._give_up(probe.worker, type(err).__name__)
            return
        log.info("worker %d is back (restarted)", probe.worker)
        self.alive[probe.worker] = True

    def tick(self) -> None:
        """Send the probes whose backoff has passed; give up the workers past their probe's deadline."""
        now = time.monotonic()
        due = [probe for at, probe in self.waiting if at <= now]
        self.waiting = [(at, probe) for at, probe in self.waiting if at > now]
        for probe in due:
            self._send(probe)
        for ref, probe in list(self.probes.items()):
            if now > probe.deadline:
                del self.probes[ref]
                self._give_up(probe.worker, f"no answer in {PROBE_S:.0f} s")

    def lost_workers(self, busy: set[int]) -> list[int]:
        """Of the `busy` workers, those Ray's actor table lists as RESTARTING or DEAD (each HEALTH_S)."""
        now = time.monotonic()
        if now < self.next_health or not busy:
            return []
        self.next_health = now + HEALTH_S
        try:  # a private Ray API (no dashboard needed); if it changes, the check is off, nothing breaks
            from ray._private.state import actors

            table = actors()
            ids = {w: self.actors[w]._actor_id.hex() for w in busy}
        except Exception:
            return []
        lost = [w for w, i in ids.items() if table.get(i, {}).get("State") in ("RESTARTING", "DEAD")]
        for worker in lost:
            log.warning("worker %d is %s; its calls go elsewhere", worker, table[ids[worker]]["State"])
        return lost

    def no_live_node(self) -> bool:
        """Whether Ray lists no alive node (an embedded cluster whose raylet died), so no worker can ever
        start again; asked at most each HEALTH_S, and only while no worker takes work."""
        now = time.monotonic()
        if any(self.alive) or now < self.next_nodes:
            return False
        self.next_nodes = now + HEALTH_S
        import ray

        try:
            return not any(node.get("Alive") for node in ray.nodes())
        except Exception:  # no answer is no proof: keep waiting on the probes
            return False

    def close(self) -> None:
        """Kill the actors this pool started (the caller kills those it handed in)."""
        import ray

        for actor in self.spawned:
            ray.kill(actor)

    def _send(self, probe: _Probe) -> None:
        self.probes[self.actors[probe.worker].describe.remote()] = probe

    def _give_up(self, worker: int, why: str) -> None:
        """Kill the worker in slot `worker` for good and, while spares last, start a new one there."""
        import ray

        ray.kill(self.actors[worker], no_restart=True)
        if self.spawn is None or self.spare < 1:
            log.warning("worker %d is gone for good (%s); no new worker may be started", worker, why)
            return
        self.spare -= 1
        self.actors[worker] = actor = self.spawn()
        self.spawned.append(actor)
        log.warning(
            "worker %d is gone (%s); a new worker takes its place (%d more allowed)", worker, why, self.spare
        )
        self._send(_Probe(worker, time.monotonic() + PROBE_S))
