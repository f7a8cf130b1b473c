#!/usr/bin/env python3
"""Example worker backend for amqp-sidecar (Python 3 standard library only).

The sidecar POSTs each AMQP delivery to this server. The worker sleeps for
WORKER_LATENCY_MS, then answers:

  * 503 at WORKER_FAILURE_RATE (0..1): a retryable failure, the sidecar requeues
    the delivery with backoff;
  * 422 at WORKER_REJECT_RATE (0..1, default 0): a permanent rejection, the
    sidecar dead-letters the delivery;
  * 200 otherwise: the sidecar acks the delivery.

GET /healthz answers 200. Every request is logged on one line together with the
X-Amqp-Message-Id and X-Amqp-Attempt headers the sidecar sends.

Environment:
  PORT                 listen port (default 8080)
  WORKER_LATENCY_MS    processing time per message in ms (default 0)
  WORKER_FAILURE_RATE  probability of answering 503 (default 0)
  WORKER_REJECT_RATE   probability of answering 422 (default 0)
  WORKER_NAME          name shown in the logs (default: the host name)

`python3 worker.py healthcheck` probes http://127.0.0.1:$PORT/healthz and exits
0 when it answers 200 (used by the container HEALTHCHECK).
"""

import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _env_float(name, default, lo=None, hi=None):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        sys.exit(f"worker: {name}={raw!r} is not a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        sys.exit(f"worker: {name}={raw!r} must be within [{lo}, {hi}]")
    return value


PORT = int(_env_float("PORT", 8080, 1, 65535))
LATENCY_S = _env_float("WORKER_LATENCY_MS", 0.0, 0) / 1000.0
FAILURE_RATE = _env_float("WORKER_FAILURE_RATE", 0.0, 0.0, 1.0)
REJECT_RATE = _env_float("WORKER_REJECT_RATE", 0.0, 0.0, 1.0)
NAME = os.environ.get("WORKER_NAME") or socket.gethostname()
DRAIN_TIMEOUT_S = 30.0

_in_flight = 0
_in_flight_cv = threading.Condition()


def log(**fields):
    fields = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "worker": NAME, **fields}
    print(json.dumps(fields, separators=(",", ":")), flush=True)


class Handler(BaseHTTPRequestHandler):
    server_version = "amqp-sidecar-example-worker/1"
    protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar pools connections
    timeout = 120  # close idle keep-alive connections after this many seconds

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/healthz":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self):
        global _in_flight
        with _in_flight_cv:
            _in_flight += 1
        try:
            self._handle_post()
        finally:
            with _in_flight_cv:
                _in_flight -= 1
                _in_flight_cv.notify_all()

    def _handle_post(self):
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if LATENCY_S > 0:
            time.sleep(LATENCY_S)
        roll = random.random()
        if roll < FAILURE_RATE:
            status, reply = 503, {"error": "simulated transient failure"}
        elif roll < FAILURE_RATE + REJECT_RATE:
            status, reply = 422, {"error": "simulated permanent rejection"}
        else:
            status, reply = 200, {"status": "processed"}
        self._reply(status, reply)
        log(
            method="POST",
            path=self.path,
            status=status,
            message_id=self.headers.get("X-Amqp-Message-Id"),
            attempt=self.headers.get("X-Amqp-Attempt"),
            bytes=len(body),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def log_message(self, fmt, *args):  # silence the default access log
        pass


def healthcheck():
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        print(f"worker healthcheck failed: {exc}", file=sys.stderr)
        return 1


def serve():
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True  # idle keep-alive connections must not block exit
    stop = threading.Event()

    def on_signal(signum, _frame):
        log(event="stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log(event="listening", port=PORT, latency_ms=LATENCY_S * 1000,
        failure_rate=FAILURE_RATE, reject_rate=REJECT_RATE)
    stop.wait()
    server.shutdown()  # stop accepting; requests already being handled go on
    with _in_flight_cv:
        _in_flight_cv.wait_for(lambda: _in_flight == 0, timeout=DRAIN_TIMEOUT_S)
        left = _in_flight
    server.server_close()
    log(event="stopped", unfinished_requests=left)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["healthcheck"]:
        sys.exit(healthcheck())
    if sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [healthcheck]")
    sys.exit(serve())
