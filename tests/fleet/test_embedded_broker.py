"""The demo's embedded broker keeps persistent sessions like Mosquitto does."""

from __future__ import annotations

import pytest
from fedge.fleet.embedded_broker import EmbeddedBroker
from fedge.protocol import make_link

pytestmark = pytest.mark.link


def test_offline_messages_reach_a_persistent_session() -> None:
    with EmbeddedBroker() as broker:
        sub = make_link(broker.url_for("dev-a"), "dev-a")
        sub.connect()
        sub.subscribe("fedge/v1/t/round")
        sub.close()  # clean disconnect; the session (clean_session=False) stays
        pub = make_link(broker.url_for("server"), "server")
        pub.connect()
        pub.publish("fedge/v1/t/round", b"while you were away", qos=1)
        pub.publish("fedge/v1/t/other", b"not subscribed", qos=1)
        pub.close()
        again = make_link(broker.url_for("dev-a"), "dev-a")
        again.connect()
        msg = again.get(5.0)
        assert msg is not None and msg.payload == b"while you were away"
        assert again.get(0.5) is None
        again.close()


def test_clients_without_a_username_are_refused() -> None:
    from fedge.protocol import LinkError

    with EmbeddedBroker() as broker:
        anonymous = make_link(broker.url, "anon")
        with pytest.raises(LinkError):
            anonymous.connect(timeout=3.0)
