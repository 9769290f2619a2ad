"""The data plane's authentication, socket to socket (no Ray, no model): with CURVE, a peer
without a rank's key reads nothing and delivers nothing; with the HMAC fallback, a reply whose
tag does not verify under the rank it claims is dropped. Either way every reply comes back with
the rank it authenticated as, and nothing raises."""

import contextlib
import hashlib
import hmac
import socket

import pytest
import zmq

from tests.entrypoints.conftest import wait_until
from tests.executor.conftest import stranger_socket
from zllm.executor.data_plane import DriverEndpoint, PlaneKeys, WorkerEndpoint, wait_for_subscribers


@contextlib.contextmanager
def two_ranks(use_curve: bool):
    """A driver endpoint and both ranks' endpoints, connected."""
    keys = PlaneKeys.generate(2, use_curve=use_curve)
    driver = DriverEndpoint("127.0.0.1", keys)
    workers = [WorkerEndpoint(driver.sched_address, driver.reply_address, k) for k in keys.ranks]
    try:
        wait_for_subscribers(driver, 2, 30, lambda: None)
        yield keys, driver, workers
    finally:
        for w in workers:
            w.close()
        driver.close()


@pytest.fixture(params=["curve", "hmac"])
def plane(request):
    with two_ranks(request.param == "curve") as endpoints:
        yield endpoints


@pytest.fixture
def curve_plane():
    with two_ranks(True) as endpoints:
        yield endpoints


@pytest.fixture
def hmac_plane():
    with two_ranks(False) as endpoints:
        yield endpoints


def test_each_rank_reaches_the_driver_tagged_with_its_rank(plane):
    keys, driver, workers = plane
    driver.publish(b"step")
    assert [w.receive(10_000) for w in workers] == [b"step", b"step"]
    workers[1].send(b"from one")
    workers[0].send(b"from zero")
    assert sorted([driver.receive(10), driver.receive(10)]) == [(0, b"from zero"), (1, b"from one")]
    assert driver.num_rejected == 0


def test_strangers_read_nothing_and_their_replies_never_arrive_with_curve(curve_plane):
    keys, driver, workers = curve_plane
    assert keys.mechanism == "curve"
    context = zmq.Context()
    try:
        spies = [stranger_socket(context, zmq.SUB, driver.sched_address),
                 stranger_socket(context, zmq.SUB, driver.sched_address, keys.server_public)]
        for spy in spies:
            spy.setsockopt(zmq.SUBSCRIBE, b"")
        forgers = [stranger_socket(context, zmq.PUSH, driver.reply_address),
                   stranger_socket(context, zmq.PUSH, driver.reply_address, keys.server_public)]
        for forger in forgers:
            with contextlib.suppress(zmq.Again):  # Again: refused before a message could queue
                forger.send(b"forged", zmq.NOBLOCK)
        # The stranger with a CURVE key of its own is refused by the ZAP handler (counted).
        wait_until(lambda: driver.num_rejected >= 2, 30, "the driver to refuse the CURVE strangers")
        driver.publish(b"secret step")
        assert [w.receive(10_000) for w in workers] == [b"secret step"] * 2
        assert not any(spy.poll(300) for spy in spies)
        workers[0].send(b"real")
        assert driver.receive(10) == (0, b"real")
        assert driver.receive(0.3) is None
    finally:
        context.destroy(linger=0)


def test_raw_bytes_on_the_reply_port_are_dropped(plane):
    keys, driver, workers = plane
    port = int(driver.reply_address.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
    workers[0].send(b"real")
    assert driver.receive(10) == (0, b"real")
    assert driver.receive(0.3) is None


def test_hmac_replies_that_do_not_verify_are_dropped_and_counted(hmac_plane):
    keys, driver, workers = hmac_plane
    assert keys.mechanism == "hmac"
    context = zmq.Context()
    try:
        forger = stranger_socket(context, zmq.PUSH, driver.reply_address)
        rank1 = keys.ranks[1]
        forged = [[b"garbage"],                                     # not [rank, tag, message]
                  [b"\x00\x00", b"\x00" * 32, b"tokens"],           # claims rank 0, no key
                  [b"\x00\x00", _tag_with(rank1.mac_key, b"\x00\x00", b"tokens"), b"tokens"],
                  [b"\x00\x09", b"\x00" * 32, b"tokens"]]           # no such rank
        for frames in forged:
            forger.send_multipart(frames)
        workers[0].send(b"real")
        assert driver.receive(10) == (0, b"real")
        # receive() drops what does not verify and answers None; poll until all are counted.
        wait_until(lambda: driver.receive(0.05) is None and driver.num_rejected == len(forged),
                   30, "every forged reply to be dropped")
    finally:
        context.destroy(linger=0)


def _tag_with(key: bytes, rank: bytes, message: bytes) -> bytes:
    """rank 1's key on a frame that claims rank 0: what a rank posing as another would send."""
    return hmac.new(key, rank + message, hashlib.sha256).digest()
