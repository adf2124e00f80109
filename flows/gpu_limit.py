"""The Prefect global concurrency limit that the GPU stage groups take a slot of (``partitions.gpu_limit_name``).

A tag limit (``prefect concurrency-limit create gpu 1``) only counts task runs; a global limit used through
``concurrency(..., strict=True)`` is enforced for every run on the same Prefect server, whatever engine runs the
task (threads, Dask or Ray workers). ``strict`` makes a missing limit an error instead of silently no limit, so
the run creates it first. An existing limit is left as it is: an operator may have sized it for the machine.

A slot is held under a lease (``gpu_slot``): Prefect renews it while the stage group runs and releases it when the
group ends; when the holder dies without a word (SIGKILL, the OOM killer, a lost node) the server takes the slot
back once the lease runs out. Prefect's default lease is 300 s, which kept every other run's GPU stages waiting,
silently, for five minutes after each such death; ``LEASE_S`` is the shortest the server grants, and a run that
waits for a slot says so in its log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound

log = logging.getLogger(__name__)

LEASE_S = 60.0
"""Seconds a GPU slot's lease lasts (renewed at 3/4 of it): how long a dead holder keeps its slot. The Prefect
server refuses shorter leases; the server's sweep of expired leases adds up to 15 s
(``PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS``)."""
POLL_S = 5.0
"""While every slot is taken, how often a waiting run looks again."""
FIRST_NOTICE_S = 10.0
NOTICE_EVERY_S = 120.0
"""A waiting run says what it waits for after FIRST_NOTICE_S, then every NOTICE_EVERY_S."""


def ensure_gpu_limit(name: str, slots: int) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` when it does not exist; returns its limit."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                log.info("created the global concurrency limit %r with %d slot(s) for the GPU stage groups",
                         name, slots)
                return slots
            except ObjectAlreadyExists:  # another run created it first
                existing = client.read_global_concurrency_limit_by_name(name)
        if existing.limit != slots:
            log.info("global concurrency limit %r exists with %d slot(s) (settings ask %d): kept as it is",
                     name, existing.limit, slots)
        return existing.limit


@contextmanager
def gpu_slot(name: str, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold one slot of the strict global concurrency limit ``name`` for the body of the ``with``.

    The slot is leased for ``lease_s`` seconds and the lease is renewed in a thread while the body runs (Prefect's
    ``concurrency``; a renewal that fails ends the body, so that the GPU is never over-committed); it is released
    when the body ends, however it ends, and by the server ``lease_s`` after a holder that died without ending it.
    """
    _wait_for_a_free_slot(name, lease_s)
    with concurrency(name, occupy=1, strict=True, lease_duration=lease_s):
        yield


def _wait_for_a_free_slot(name: str, lease_s: float) -> None:
    """Return once ``name`` has a free slot (or does not exist, or is inactive: ``concurrency`` decides then),
    logging what the run waits for. Another run may still take the slot first: ``concurrency`` then waits on
    Prefect's own retries."""
    started = time.monotonic()
    next_notice = FIRST_NOTICE_S
    with get_client(sync_client=True) as client:
        while True:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                return
            if not limit.active or limit.active_slots < limit.limit:
                return
            waited = time.monotonic() - started
            if waited >= next_notice:
                _logger().info(
                    "waiting for a slot of the global concurrency limit %r: %d of %d slot(s) are held by other GPU "
                    "task runs (of this flow run or another on this Prefect server); waited %.0f s so far. A holder "
                    "that died gives its slot back when its %.0f s lease runs out.",
                    name, limit.active_slots, limit.limit, waited, lease_s)
                next_notice += NOTICE_EVERY_S
            time.sleep(POLL_S)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (the message reaches the run's log in the UI), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log
