"""The per-step path between the driver and the workers: two ZeroMQ sockets, msgpack bytes.

The driver binds both ends (ports picked by the OS) and hands their addresses to the workers
through Ray. Scheduler outputs go out on an XPUB socket that every rank subscribes to; replies
(rank 0's output, or any rank's error) come back to one PULL socket. XPUB rather than PUB so the
driver can see each subscription arrive: a PUB socket drops messages sent before a subscriber has
joined, and counting subscriptions is the handshake that rules that out without sleeping.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import zmq

logger = logging.getLogger(__name__)


class DriverEndpoint:
    """The driver's end: publish scheduler outputs, receive replies."""

    def __init__(self, host: str) -> None:
        self.context = zmq.Context()
        self.publisher = self.context.socket(zmq.XPUB)
        self.publisher.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, not just the first
        self.publisher.setsockopt(zmq.LINGER, 0)
        port = self.publisher.bind_to_random_port(f"tcp://{host}")
        self.sched_address = f"tcp://{host}:{port}"
        self.replies = self.context.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        port = self.replies.bind_to_random_port(f"tcp://{host}")
        self.reply_address = f"tcp://{host}:{port}"
        self.num_subscribers = 0

    def poll_subscriptions(self, timeout_s: float) -> int:
        """Count subscriptions that arrived within timeout_s; returns the total so far."""
        if self.publisher.poll(int(timeout_s * 1000)):
            while self.publisher.poll(0):
                if self.publisher.recv()[:1] == b"\x01":  # \x01 subscribe, \x00 unsubscribe
                    self.num_subscribers += 1
        return self.num_subscribers

    def publish(self, message: bytes) -> None:
        self.publisher.send(message, copy=False)

    def receive(self, timeout_s: float) -> Optional[bytes]:
        """One reply, or None if none came within timeout_s."""
        if self.replies.poll(int(timeout_s * 1000)):
            return self.replies.recv()
        return None

    def close(self) -> None:
        self.publisher.close()
        self.replies.close()
        self.context.term()


class WorkerEndpoint:
    """A worker's end: receive scheduler outputs, send replies. Used by one thread only."""

    def __init__(self, sched_address: str, reply_address: str) -> None:
        self.context = zmq.Context()
        self.subscriber = self.context.socket(zmq.SUB)
        self.subscriber.setsockopt(zmq.LINGER, 0)
        self.subscriber.connect(sched_address)
        self.subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        self.sender = self.context.socket(zmq.PUSH)
        self.sender.setsockopt(zmq.LINGER, 1000)  # let a last error reply leave before close
        self.sender.connect(reply_address)

    def receive(self, timeout_ms: Optional[int] = None) -> Optional[bytes]:
        """The next message; None if none arrives within timeout_ms (None: wait forever)."""
        if timeout_ms is not None and not self.subscriber.poll(timeout_ms):
            return None
        return self.subscriber.recv()

    def send(self, message: bytes) -> None:
        self.sender.send(message, copy=False)

    def close(self) -> None:
        self.subscriber.close()
        self.sender.close()
        self.context.term()


def wait_for_subscribers(endpoint: DriverEndpoint, count: int, timeout_s: float,
                         check_alive) -> None:
    """Block until `count` workers subscribed; `check_alive()` raises if one died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while endpoint.poll_subscriptions(0.1) < count:
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {endpoint.num_subscribers} of {count} workers connected to "
                               f"{endpoint.sched_address} within {timeout_s:.0f} s")
