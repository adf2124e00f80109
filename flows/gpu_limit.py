"""The Prefect global concurrency limit that the GPU stage groups take a slot of (``partitions.gpu_limit_name``).

A tag limit (``prefect concurrency-limit create gpu 1``) only counts task runs; a global limit used through
``concurrency(..., strict=True)`` is enforced for every run on the same Prefect server, whatever engine runs the
task (threads, Dask or Ray workers). ``strict`` makes a missing limit an error instead of silently no limit, so
the run creates it first. An existing limit is left as it is: an operator may have sized it for the machine.
"""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

log = logging.getLogger(__name__)


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
