"""The reactor roles promgate's objects are typed with are ones a real reactor plays."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface

from promgate import reactors


class ReactorRoleTests(SynchronousTestCase):
    """``makeService`` casts the global reactor to ``IGatewayReactor``: check that it
    provides every Twisted interface that role (and so every smaller one) is made of."""

    def test_global_reactor_plays_every_role(self) -> None:
        from twisted.internet import reactor

        for name in reactors.__all__:
            role = getattr(reactors, name)
            parts = [
                i for i in role.__iro__ if i is not Interface and i.__module__ != reactors.__name__
            ]
            missing = [i.__name__ for i in parts if not i.providedBy(reactor)]
            self.assertEqual(missing, [], name)

    def test_gateway_role_holds_the_others(self) -> None:
        """Whatever the gateway's reactor is, it can be handed to each part."""
        for name in reactors.__all__:
            self.assertTrue(reactors.IGatewayReactor.isOrExtends(getattr(reactors, name)), name)
