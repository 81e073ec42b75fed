"""16 concurrent clients x 4 requests: every request answered once, with its own result, or
turned away with 503 + Retry-After; the server runs exactly the answered jobs. (Throughput and
memory: `python -m edgediff.benchmarks.server_load`, figures in benchmarks/RESULTS.md.)"""
from __future__ import annotations

from live_server import running
from edgediff.benchmarks.server_load import check, drive, get_json
from edgediff.server import Limits, create_app

CLIENTS, PER_CLIENT, STEPS, SIZE = 16, 4, 1, 64


def test_concurrent_clients_are_each_answered_once(default_pipe):
    with running(create_app(default_pipe, limits=Limits(max_queue=4))) as url:
        before = get_json(url, "/health")["completed"]
        outcomes, _ = drive(url, CLIENTS, PER_CLIENT, STEPS, SIZE)
        ran = get_json(url, "/health")["completed"] - before
    assert check(outcomes, CLIENTS, PER_CLIENT, STEPS, SIZE) == []
    answered = sum(o.status == 200 for o in outcomes)
    assert ran == answered > 0
    assert answered + sum(o.status == 503 for o in outcomes) == CLIENTS * PER_CLIENT
