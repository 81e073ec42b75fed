"""`edgediff serve` under load, against a plain loop of pipe() calls in one process.

    python -m edgediff.benchmarks.server_load [--clients 16] [--requests 4] [--steps 20] [--rounds 3]

Starts the server in a subprocess on a free 127.0.0.1 port (the shipped default model, CPU,
sessions resident) and, ROUNDS times back to back in the same conditions, runs a plain loop of
CLIENTS x REQUESTS pipe() calls in this process, then the server under CLIENTS concurrent
clients x REQUESTS each (the machine may be shared: interleaving pairs the two). Checks that every
request was answered once (200 with its own prompt and seed, or 503 with Retry-After), that the
server ran exactly the answered jobs, and that its RSS after the run is within 10% of its RSS
after the first request. Then an overload round with a short queue (--overload-queue) shows the
503s. Prints images/s, the server's overhead, RSS and the load average.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


@dataclass
class Outcome:
    client: int
    index: int
    status: int
    retry_after: str | None
    prompt: str | None = None
    seed: int | None = None
    images: int = 0


def request_body(client: int, index: int, steps: int, size: int) -> dict:
    return {"prompt": f"a red circle, client {client} request {index}", "seed": 1000 * client + index,
            "steps": steps, "width": size, "height": size, "sampler_name": "Euler", "cfg_scale": 7.0}


def post(url: str, path: str, body: dict, timeout: float = 600) -> tuple[int, dict, bytes]:
    host, port = url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(url: str, path: str) -> dict:
    host, port = url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def drive(url: str, clients: int, per_client: int, steps: int, size: int) -> tuple[list[Outcome], float]:
    """CLIENTS threads, each sending PER_CLIENT txt2img requests one after another."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start_together = threading.Barrier(clients)

    def client(c: int):
        start_together.wait()
        for i in range(per_client):
            status, headers, data = post(url, "/sdapi/v1/txt2img", request_body(c, i, steps, size))
            outcome = Outcome(c, i, status, headers.get("retry-after"))
            if status == 200:
                body = json.loads(data)
                info = json.loads(body["info"])
                outcome.prompt, outcome.seed, outcome.images = info["prompt"], info["seed"], len(body["images"])
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - started


def check(outcomes: list[Outcome], clients: int, per_client: int, steps: int, size: int) -> list[str]:
    """Problems found (empty: every request answered exactly once, with its own result)."""
    problems = []
    keys = sorted((o.client, o.index) for o in outcomes)
    if keys != [(c, i) for c in range(clients) for i in range(per_client)]:
        problems.append(f"{len(outcomes)} answers for {clients * per_client} requests")
    for o in outcomes:
        sent = request_body(o.client, o.index, steps, size)
        if o.status == 200 and (o.prompt != sent["prompt"] or o.seed != sent["seed"] or o.images != 1):
            problems.append(f"request {o.client}/{o.index} got someone else's answer: {o.prompt!r} {o.seed}")
        elif o.status == 503 and not (o.retry_after or "").isdigit():
            problems.append(f"request {o.client}/{o.index}: 503 without Retry-After")
        elif o.status not in (200, 503):
            problems.append(f"request {o.client}/{o.index}: status {o.status}")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgediff", "serve", "--provider", "cpu", "--memory", "high",
                             "--port", str(port), "--max-queue", str(queue)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            get_json(url, "/health")
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def plain_loop(pipe, n: int, steps: int, size: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of pipe() calls in this process, the same work per
    image as a request."""
    import psutil

    me = psutil.Process()
    started, cpu = time.perf_counter(), cpu_seconds(me)
    for k in range(n):
        body = request_body(k % 16, k, steps, size)
        pipe(body["prompt"], steps=steps, guidance=7.0, sampler="euler", seed=body["seed"], width=size, height=size)
    return n / (time.perf_counter() - started), (cpu_seconds(me) - cpu) / n


def main(argv=None) -> int:
    import psutil

    from edgediff.runtime import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="loop/server pairs, interleaved")
    parser.add_argument("--queue", type=int, default=16, help="server queue for the throughput rounds")
    parser.add_argument("--overload-queue", type=int, default=4, help="server queue for the 503 round")
    args = parser.parse_args(argv)
    total = args.clients * args.requests
    load_before = os.getloadavg()
    pipe = Pipeline.load(None, provider="cpu", memory="high")
    pipe("warm up", steps=args.steps, width=args.size, height=args.size, seed=0)

    problems, rows = [], []
    proc, url = start_server(args.queue)
    try:
        server = psutil.Process(proc.pid)
        status, _, _ = post(url, "/sdapi/v1/txt2img", request_body(99, 0, args.steps, args.size))
        assert status == 200, status
        rss_first = server.memory_info().rss
        for _ in range(args.rounds):
            loop, loop_cpu = plain_loop(pipe, total, args.steps, args.size)
            done_before, cpu = get_json(url, "/health")["completed"], cpu_seconds(server)
            outcomes, seconds = drive(url, args.clients, args.requests, args.steps, args.size)
            server_cpu, ran = cpu_seconds(server) - cpu, get_json(url, "/health")["completed"] - done_before
            problems += check(outcomes, args.clients, args.requests, args.steps, args.size)
            ok = sum(o.status == 200 for o in outcomes)
            if ran != ok:
                problems.append(f"the server ran {ran} jobs for {ok} answered requests")
            rows.append((loop, ok / seconds, loop_cpu, server_cpu / max(ok, 1), ok, os.getloadavg()[0]))
        rss_after = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    proc, url = start_server(args.overload_queue)
    try:
        over, _ = drive(url, args.clients, args.requests, args.steps, args.size)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    problems += check(over, args.clients, args.requests, args.steps, args.size)
    load_after = os.getloadavg()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average before {load_before[0]:.2f} {load_before[1]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f}")
    print(f"default model {args.size}x{args.size}, {args.steps} steps, Euler, CFG 7; "
          f"{args.clients} clients x {args.requests} requests per round, queue {args.queue}")
    print("round | plain loop img/s | server img/s | wall overhead | loop CPU s/img | server CPU s/img | CPU overhead | 200s | load")
    for i, (loop, served, loop_cpu, server_cpu, ok, load) in enumerate(rows, 1):
        print(f"{i} | {loop:.3f} | {served:.3f} | {100 * (1 - served / loop):+.1f}% | {loop_cpu:.3f} | "
              f"{server_cpu:.3f} | {100 * (server_cpu / loop_cpu - 1):+.1f}% | {ok}/{total} | {load:.1f}")
    loops, served = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"all rounds: plain loop {loops / len(rows):.3f} img/s, server {served / len(rows):.3f} img/s, "
          f"overhead {100 * (1 - served / loops):+.1f}% (median per round "
          f"{100 * sorted(1 - r[1] / r[0] for r in rows)[len(rows) // 2]:+.1f}%)")
    print(f"server RSS after first request {rss_first / 2**20:.1f} MiB, after {args.rounds * total} more "
          f"{rss_after / 2**20:.1f} MiB ({100 * (rss_after / rss_first - 1):+.1f}%)")
    print(f"overload (queue {args.overload_queue}): {sum(o.status == 200 for o in over)} answered 200, "
          f"{sum(o.status == 503 for o in over)} answered 503 with Retry-After")
    if abs(rss_after / rss_first - 1) > 0.10:
        problems.append("server RSS grew by more than 10%")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
