"""Asking Redis Sentinel for the master, on a deterministic clock with each sentinel's
answers given by the test: what counts as a master, the first good answer wins, a
silent sentinel is asked one question at a time and costs at most the timeout."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from promgate.redis_sentinel import MasterNotNamedError, Sentinels, master_address


def reply(flags: str, ip: str = "10.0.0.1", port: Any = 6379) -> list[Any]:
    """A ``SENTINEL MASTER`` reply as txredisapi gives it (numbers converted)."""
    return ["name", "promgate", "ip", ip, "port", port, "flags", flags, "num-slaves", 1]


class Refusing:
    """A connection that txredisapi has given up on: it raises at once."""

    def execute_command(self, *args: Any) -> Deferred[Any]:
        raise ConnectionError("Not connected")

    def disconnect(self) -> Deferred[None]:
        return succeed(None)


class Answering:
    """A sentinel's connection whose questions wait for the test to answer them."""

    def __init__(self) -> None:
        self.asked: list[Deferred[Any]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        assert args == ("SENTINEL", "MASTER", "promgate"), args
        d: Deferred[Any] = Deferred()
        self.asked.append(d)
        return d

    def disconnect(self) -> Deferred[None]:
        return succeed(None)


class MasterAddressTests(SynchronousTestCase):
    def test_good_master(self) -> None:
        self.assertEqual(master_address(reply("master")), ("10.0.0.1", 6379))
        self.assertEqual(master_address(reply("master", port="6380")), ("10.0.0.1", 6380))

    def test_not_a_good_master(self) -> None:
        for flags in ("master,s_down", "master,o_down", "master,disconnected", "slave"):
            self.assertIsNone(master_address(reply(flags)), flags)
        self.assertIsNone(master_address(reply("master", port="x")))
        self.assertIsNone(master_address(["name", "promgate", "flags", "master"]))
        self.assertIsNone(master_address([]))


class SentinelsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.a, self.b = Answering(), Answering()
        self.sentinels = Sentinels([self.a, self.b], self.clock, timeout=2.0)

    def test_first_good_answer(self) -> None:
        d = self.sentinels.master("promgate")
        self.a.asked[0].callback(reply("master,s_down"))
        self.assertNoResult(d)
        self.b.asked[0].callback(reply("master", ip="10.0.0.2"))
        self.assertEqual(self.successResultOf(d), ("10.0.0.2", 6379))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_none_good(self) -> None:
        """Every sentinel answered, none with a good master (or with an error, such as
        an unknown name): it fails at once."""
        d = self.sentinels.master("promgate")
        self.a.asked[0].callback(reply("master,o_down"))
        self.b.asked[0].errback(Exception("ERR No such master with that name"))
        self.failureResultOf(d, MasterNotNamedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_silent_sentinel(self) -> None:
        """A sentinel that does not answer: each question fails after the timeout, and
        it is never asked a second question while the first waits; its late answer
        serves the question still waiting, and none that has given up."""
        self.b.asked.clear()
        first = self.sentinels.master("promgate")
        self.a.asked[0].callback(reply("slave"))
        self.clock.advance(2.0)
        self.failureResultOf(first, MasterNotNamedError)
        for _ in range(5):
            late = self.sentinels.master("promgate")
            self.a.asked[-1].callback(reply("slave"))
            self.assertNoResult(late)  # b may still name one
            self.clock.advance(2.0)
            self.failureResultOf(late, MasterNotNamedError)
        waiting = self.sentinels.master("promgate")
        self.assertEqual(len(self.b.asked), 1)  # the first question, still unanswered
        self.assertEqual(len(self.a.asked), 7)  # a answers; it is asked every time
        self.b.asked[0].callback(reply("master"))
        self.assertEqual(self.successResultOf(waiting), ("10.0.0.1", 6379))
        # Asked again now that it has answered.
        self.sentinels.master("promgate")
        self.assertEqual(len(self.b.asked), 2)

    def test_cancelled(self) -> None:
        """A question cancelled (a connection attempt given up) leaves nothing on the
        clock, and the answer that comes after serves no one."""
        d = self.sentinels.master("promgate")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.a.asked[0].callback(reply("master"))

    def test_disconnect_cancels_open_questions(self) -> None:
        d = self.sentinels.master("promgate")
        self.successResultOf(self.sentinels.disconnect())
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_given_up(self) -> None:
        """A sentinel whose connection raises counts as one that names no master; it is
        asked again next time."""
        sentinels = Sentinels([Refusing(), self.a], self.clock)
        d = sentinels.master("promgate")
        self.a.asked[0].callback(reply("slave"))
        self.failureResultOf(d, MasterNotNamedError)
        d = sentinels.master("promgate")
        self.a.asked[1].callback(reply("master"))
        self.assertEqual(self.successResultOf(d), ("10.0.0.1", 6379))

    def test_reply_not_understood(self) -> None:
        """A reply of another shape counts as no answer, and the sentinel is asked
        again next time."""
        d = self.sentinels.master("promgate")
        self.a.asked[0].callback(None)
        self.b.asked[0].callback(reply("slave"))
        self.failureResultOf(d, MasterNotNamedError)
        d = self.sentinels.master("promgate")
        self.a.asked[1].callback(reply("master"))
        self.assertEqual(self.successResultOf(d), ("10.0.0.1", 6379))
