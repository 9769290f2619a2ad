"""The per-step path between the driver and the workers: two ZeroMQ sockets, msgpack bytes.

The driver binds both ends (ports picked by the OS) and hands their addresses to the workers
through Ray. Scheduler outputs go out on an XPUB socket that every rank subscribes to; replies
(rank 0's output, or any rank's error) come back to one PULL socket. XPUB rather than PUB so the
driver can see each subscription arrive: a PUB socket drops messages sent before a subscriber has
joined, and counting subscriptions is the handshake that rules that out without sleeping.

Each run has its own authentication. The driver makes the keys once per executor
(`PlaneKeys.generate`) and hands each rank its own at start-up, over Ray (which authenticates
its own connections); a restarted rank gets the same keys again.
- CURVE (ZeroMQ's own, the default): both driver sockets are CURVE servers, so every byte is
  encrypted, and a ZAP handler admits only the ranks' public keys. A peer without a rank's key
  never completes the handshake: it reads nothing and sends nothing. Every reply carries the rank
  its connection authenticated as, so a reply is accepted only from the rank it claims to be.
- HMAC (only where libzmq lacks CURVE; logged): each reply carries its rank and an HMAC-SHA256
  tag under that rank's key. Steps go out unencrypted.
A reply that does not authenticate is dropped, logged (rate-limited) and counted; it never stops
the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Optional

import zmq

logger = logging.getLogger(__name__)

_RANK_BYTES = 2  # HMAC framing: [rank (big-endian), tag, message]


@dataclass(frozen=True)
class RankKeys:
    """What one rank needs to join the data plane: the driver's public key and its own keys."""

    rank: int
    mechanism: str  # "curve" | "hmac"
    server_public: bytes = b""  # curve: the driver's public key (z85)
    public: bytes = b""  # curve: this rank's key pair (z85)
    secret: bytes = b""
    mac_key: bytes = b""  # hmac: the key this rank tags its replies with


@dataclass(frozen=True)
class PlaneKeys:
    """One run's data-plane keys: the driver's and every rank's. Never leaves the driver whole."""

    mechanism: str
    server_public: bytes
    server_secret: bytes
    ranks: tuple[RankKeys, ...]

    @classmethod
    def generate(cls, num_ranks: int, use_curve: Optional[bool] = None) -> "PlaneKeys":
        """Fresh keys; CURVE where libzmq has it (use_curve=False forces HMAC, for tests)."""
        if use_curve is None:
            use_curve = zmq.has("curve")
            if not use_curve:
                logger.warning("data plane: this libzmq has no CURVE; replies are authenticated "
                               "with HMAC-SHA256, and scheduler outputs travel unencrypted")
        if not use_curve:
            return cls("hmac", b"", b"", tuple(RankKeys(r, "hmac", mac_key=secrets.token_bytes(32))
                                               for r in range(num_ranks)))
        server_public, server_secret = zmq.curve_keypair()
        ranks = tuple(RankKeys(r, "curve", server_public, *zmq.curve_keypair())
                      for r in range(num_ranks))
        return cls("curve", server_public, server_secret, ranks)


class RejectLog:
    """Counts dropped frames; logs the first at once, then one line per interval at most (a
    flood of garbage must not flood the log too). Thread-safe: the ZAP handler's thread counts
    refused connections."""

    def __init__(self, what: str, interval_s: float = 10.0) -> None:
        self.what, self.interval_s = what, interval_s
        self.count = 0
        self._logged_count, self._logged_at = 0, float("-inf")
        self._lock = threading.Lock()

    def reject(self, why: str) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now - self._logged_at >= self.interval_s:
                logger.warning("%s: dropped %d frame(s) since the last report (%d in all); "
                               "latest: %s", self.what, self.count - self._logged_count,
                               self.count, why[:200])
                self._logged_count, self._logged_at = self.count, now


class _RankKeyring:
    """The ZAP handler's credentials provider: admits the ranks' CURVE public keys only."""

    def __init__(self, keys: PlaneKeys, rejects: RejectLog) -> None:
        self.rank_of = {k.public: k.rank for k in keys.ranks}  # z85 public key -> rank
        self.rejects = rejects

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.rank_of:
            return True
        self.rejects.reject("a connection with an unknown CURVE key was refused")
        return False


class DriverEndpoint:
    """The driver's end: publish scheduler outputs, receive authenticated replies."""

    def __init__(self, host: str, keys: PlaneKeys) -> None:
        self.keys = keys
        self.rejects = RejectLog("data plane (driver)")
        self.context = zmq.Context()
        self.authenticator = None
        if keys.mechanism == "curve":
            from zmq.auth.thread import ThreadAuthenticator

            self.keyring = _RankKeyring(keys, self.rejects)
            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve_callback("*", credentials_provider=self.keyring)
        self.publisher = self._bind(zmq.XPUB, host)
        self.publisher.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, not just the first
        self.sched_address = self.publisher.last_endpoint.decode()
        self.replies = self._bind(zmq.PULL, host)
        self.reply_address = self.replies.last_endpoint.decode()
        self.num_subscribers = 0
        self._mac_keys = [k.mac_key for k in keys.ranks]

    def _bind(self, kind: int, host: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys.mechanism == "curve":
            sock.curve_server = True
            sock.curve_publickey = self.keys.server_public
            sock.curve_secretkey = self.keys.server_secret
        sock.bind_to_random_port(f"tcp://{host}")
        return sock

    @property
    def num_rejected(self) -> int:
        return self.rejects.count

    def poll_subscriptions(self, timeout_s: float) -> int:
        """Count subscriptions that arrived within timeout_s; returns the total so far."""
        if self.publisher.poll(int(timeout_s * 1000)):
            while self.publisher.poll(0):
                if self.publisher.recv()[:1] == b"\x01":  # \x01 subscribe, \x00 unsubscribe
                    self.num_subscribers += 1
        return self.num_subscribers

    def publish(self, message: bytes) -> None:
        self.publisher.send(message, copy=False)

    def receive(self, timeout_s: float) -> Optional[tuple[int, bytes]]:
        """One authenticated reply, (sender's rank, message), or None if none came within
        timeout_s. Frames that do not authenticate are dropped and counted."""
        deadline = time.monotonic() + timeout_s
        while self.replies.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            if self.keys.mechanism == "curve":
                frame = self.replies.recv(copy=False)
                rank = self.keyring.rank_of.get(frame.get("User-Id").encode())
                if rank is not None:
                    return rank, frame.bytes
                self.rejects.reject("a reply from a connection that is no rank's")
                continue
            reply = self._open(self.replies.recv_multipart())
            if reply is not None:
                return reply
        return None

    def _open(self, frames: list[bytes]) -> Optional[tuple[int, bytes]]:
        """An HMAC-framed reply's rank and message, or None (counted) if it does not verify."""
        if len(frames) != 3 or len(frames[0]) != _RANK_BYTES:
            self.rejects.reject(f"a reply of {len(frames)} frame(s), not [rank, tag, message]")
            return None
        rank = int.from_bytes(frames[0], "big")
        if rank >= len(self._mac_keys) or not hmac.compare_digest(
                frames[1], _tag(self._mac_keys[rank], frames[0], frames[2])):
            self.rejects.reject(f"a reply claiming rank {rank} failed authentication")
            return None
        return rank, frames[2]

    def close(self) -> None:
        self.publisher.close()
        self.replies.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()


def _tag(key: bytes, rank: bytes, message: bytes) -> bytes:
    return hmac.new(key, rank + message, hashlib.sha256).digest()


class WorkerEndpoint:
    """A worker's end: receive scheduler outputs, send replies. Used by one thread only."""

    def __init__(self, sched_address: str, reply_address: str, keys: RankKeys) -> None:
        self.keys = keys
        self._rank = keys.rank.to_bytes(_RANK_BYTES, "big")
        self.context = zmq.Context()
        self.subscriber = self._connect(zmq.SUB, sched_address)
        self.subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        self.sender = self._connect(zmq.PUSH, reply_address)
        self.sender.setsockopt(zmq.LINGER, 1000)  # let a last error reply leave before close

    def _connect(self, kind: int, address: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys.mechanism == "curve":
            sock.curve_serverkey = self.keys.server_public
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
        sock.connect(address)
        return sock

    def receive(self, timeout_ms: Optional[int] = None) -> Optional[bytes]:
        """The next message; None if none arrives within timeout_ms (None: wait forever)."""
        if timeout_ms is not None and not self.subscriber.poll(timeout_ms):
            return None
        return self.subscriber.recv()

    def send(self, message: bytes) -> None:
        if self.keys.mechanism == "curve":
            self.sender.send(message, copy=False)
        else:
            tag = _tag(self.keys.mac_key, self._rank, message)
            self.sender.send_multipart([self._rank, tag, message], copy=False)

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
