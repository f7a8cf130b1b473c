#!/usr/bin/env python3
"""Demo load for the compose stack (Python 3 standard library only).

Publishes JSON messages to a queue through the RabbitMQ management HTTP API
(POST /api/exchanges/{vhost}/amq.default/publish), so no AMQP client library is
needed. It never declares the queue: amqp-sidecar declares it with its own
arguments (quorum type, dead-letter settings), and a declaration with other
arguments would clash. Until the queue exists the broker answers
{"routed": false}; the publisher then waits and tries again.

Environment:
  RABBITMQ_API     management API base URL (default http://rabbitmq:15672)
  RABBITMQ_USER    user (default guest)
  RABBITMQ_PASS    password (default guest)
  RABBITMQ_VHOST   virtual host (default /)
  PUBLISH_QUEUE    queue name (default orders)
  PUBLISH_RATE     messages per second (default 5)
  PUBLISH_COUNT    number of messages, 0 = until stopped (default 0)
"""

import base64
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

API = os.environ.get("RABBITMQ_API", "http://rabbitmq:15672").rstrip("/")
USER = os.environ.get("RABBITMQ_USER", "guest")
PASS = os.environ.get("RABBITMQ_PASS", "guest")
VHOST = os.environ.get("RABBITMQ_VHOST", "/")
QUEUE = os.environ.get("PUBLISH_QUEUE", "orders")
RATE = float(os.environ.get("PUBLISH_RATE", "5"))
COUNT = int(os.environ.get("PUBLISH_COUNT", "0"))

URL = f"{API}/api/exchanges/{urllib.parse.quote(VHOST, safe='')}/amq.default/publish"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASS}".encode()).decode()

running = True


def stop(_signum, _frame):
    global running
    running = False


def publish(seq):
    body = {
        "properties": {
            "delivery_mode": 2,
            "content_type": "application/json",
            "message_id": str(uuid.uuid4()),
        },
        "routing_key": QUEUE,
        "payload": json.dumps({"order_id": seq, "created_at": time.time()}),
        "payload_encoding": "string",
    }
    req = urllib.request.Request(
        URL,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": AUTH},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bool(json.load(resp).get("routed"))


def main():
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    interval = 1.0 / RATE if RATE > 0 else 0.0
    sent = 0
    print(f"publisher: {URL} queue={QUEUE} rate={RATE}/s count={COUNT or 'unbounded'}", flush=True)
    next_at = time.monotonic()
    while running and (COUNT == 0 or sent < COUNT):
        try:
            if publish(sent + 1):
                sent += 1
                if sent % 100 == 0:
                    print(f"publisher: {sent} messages published", flush=True)
            else:
                print(f"publisher: queue {QUEUE!r} does not exist yet, waiting", flush=True)
                time.sleep(2)
                next_at = time.monotonic()
                continue
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"publisher: {exc}; retrying in 2s", flush=True)
            time.sleep(2)
            next_at = time.monotonic()
            continue
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"publisher: done, {sent} messages published", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
