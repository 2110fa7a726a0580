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


def test_a_sim_without_a_broker_gets_an_embedded_one_for_its_run() -> None:
    from fedge.protocol import LinkError

    from fedge.cli import _sim_broker

    with _sim_broker("mqtt://broker.example:1883") as (url, url_for):
        assert url == "mqtt://broker.example:1883" and url_for is None  # nothing started
    with _sim_broker(None) as (url, url_for):
        assert url_for is not None
        link = make_link(url_for("dev-a"), "dev-a")
        link.connect(timeout=5.0)
        link.close()
    late = make_link(url_for("dev-a"), "dev-a")
    with pytest.raises(LinkError):  # stopped once the run is over
        late.connect(timeout=1.0)
