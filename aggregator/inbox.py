"""Quiet devices: rounds and models sent to one device's inbox, so its radio can sleep.

A quiet device (``Status.quiet``, the agent's ``quiet = true``) listens only on
``inbox/{device}``. When a round selects it, the aggregator sends it there, in order:

1. the model it lacks: the chain of model deltas from the version it holds (the very bytes
   that went to the retained ``global/delta``, signed as such), or the whole model when the
   chain is gone (a full sync since) or would be larger;
2. the round announcement, the same signed bytes as the retained one.

Between the rounds it is selected for, nothing reaches it: the broadcast announcements and
models of every round do not wake its radio. After each start, though, it listens to every
round until its inbox brings a message (a broker may grant a subscription it will not
deliver on), and its statuses say so (``Status.listening``): such a device gets every
round's announcement in its inbox as well, selected or not, so that its inbox proves itself
within a round; until then it counts as listening, not asleep.

A quiet device whose upload gate holds its update back may also declare a rest
(``SkipNotice.rest``): it is not selected for that many rounds, and the round records say it
rested, not that it dropped out. If every online device rests, the one whose rest ends first
is selected early (its inbox wakes it).

The version each device holds comes from its statuses (every one says it) and from what was
sent to it; a device that cannot use what it got asks for the model (``wants_model``) and
gets the whole one in its inbox. What is kept is in memory only: after a restart statuses
bring the versions back (they are retained), and a rest forgotten only means a device is
woken before its rest is over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fedge.protocol import Link, Topics
from fedge.protocol.wire import PUBACK_SIZE, publish_size

MAX_CHAIN = 32  # model deltas kept for quiet devices that are behind


class Inboxes:
    """What the aggregator knows of its quiet devices, and what it sends them."""

    def __init__(self, topics: Topics, link: Link) -> None:
        self.topics = topics
        self.link = link
        self.quiet: set[str] = set()
        # ...of which these still listen to every round: their inbox has brought nothing yet.
        self.listening: set[str] = set()
        self.held: dict[str, int] = {}  # device -> the model version it holds (-1: none)
        self.rest_until: dict[str, int] = {}  # device -> the last round it rests in
        self._chain: dict[int, bytes] = {}  # version -> the signed delta from version - 1
        self._whole: tuple[int, bytes] | None = None  # (version, signed whole model)
        self.sent = 0  # messages sent to inboxes

    # -- what devices say --------------------------------------------------------------
    def note_status(
        self,
        device: str,
        quiet: bool,
        model_version: int | None,
        *,
        listening: bool | None = None,
    ) -> None:
        """What a status says (``listening`` None: nothing of it, as the birth message)."""
        if quiet:
            self.quiet.add(device)
        else:
            self.quiet.discard(device)
            self.rest_until.pop(device, None)
        if quiet and listening:
            self.listening.add(device)
        elif not quiet or listening is not None:
            self.listening.discard(device)
        if model_version is not None:
            self.held[device] = model_version

    def note_rest(self, device: str, round_id: int, rest: int) -> None:
        """A quiet device skipped ``round_id`` and sits out the ``rest`` rounds after it."""
        if rest and device in self.quiet:
            self.rest_until[device] = round_id + rest

    def resting(self, round_id: int, online: Iterable[str]) -> set[str]:
        """The online devices that rest in ``round_id``."""
        return {d for d in online if self.rest_until.get(d, 0) >= round_id}

    def selectable(self, round_id: int, online: Iterable[str], least: int) -> list[str]:
        """The online devices a round may select: not those resting, unless fewer than
        ``least`` would be left (then the ones whose rest ends soonest are woken early)."""
        online = sorted(online)
        resting = self.resting(round_id, online)
        awake = [d for d in online if d not in resting]
        if len(awake) < least:
            early = sorted(resting, key=lambda d: (self.rest_until[d], d))
            woken = early[: least - len(awake)]
            for device in woken:
                del self.rest_until[device]
            awake = sorted(awake + woken)
        return awake

    # -- what the aggregator publishes -------------------------------------------------
    def model_published(self, version: int, delta: bytes | None) -> None:
        """A new global model went out: as a delta from ``version - 1`` (kept for quiet
        devices that are behind), or whole (``delta`` None: older deltas no longer apply)."""
        if delta is None:
            self._chain.clear()
            # The same version sent whole again may hold other bits (a resync of the
            # devices' copy): a quiet device that holds it gets it whole at its next round.
            for device in self.quiet:
                if self.held.get(device, -1) >= version:
                    self.held[device] = version - 1
        else:
            self._chain[version] = delta
            for old in sorted(self._chain)[:-MAX_CHAIN]:
                del self._chain[old]

    def deliver(
        self,
        device: str,
        announcement: bytes,
        version: int,
        whole: Callable[[], bytes],
    ) -> int:
        """Send ``device`` the model it lacks and the round's announcement; the MQTT bytes
        it receives (each a QoS 1 PUBLISH and the PUBACK it answers with)."""
        topic = self.topics.inbox(device)
        payloads = [*self.catch_up(device, version, whole), announcement]
        for payload in payloads:
            self.link.publish(topic, payload, qos=1)
        self.sent += len(payloads)
        self.held[device] = version
        return sum(publish_size(topic, len(p), 1) + PUBACK_SIZE for p in payloads)

    def probe(self, device: str, announcement: bytes) -> None:
        """A round that does not select ``device``, to its inbox: the device still listens
        to every round, and the first message there shows it that its inbox works. No model
        with it: it hears the broadcast ones."""
        self.link.publish(self.topics.inbox(device), announcement, qos=1)
        self.sent += 1

    def send_whole(self, device: str, version: int, whole: Callable[[], bytes]) -> int:
        """The whole model, to a quiet device that asked for it (``wants_model``); the MQTT
        bytes it receives."""
        topic, payload = self.topics.inbox(device), self._whole_payload(version, whole)
        self.link.publish(topic, payload, qos=1)
        self.sent += 1
        self.held[device] = version
        return publish_size(topic, len(payload), 1) + PUBACK_SIZE

    def catch_up(self, device: str, version: int, whole: Callable[[], bytes]) -> list[bytes]:
        """What takes ``device`` from the version it holds to ``version``: the deltas in
        between when all are kept and together smaller than the whole model, else that."""
        have = self.held.get(device, -1)
        if have >= version:
            return []
        full = self._whole_payload(version, whole)
        if have < 0 or version - have > len(self._chain):  # (no walk over versions not kept)
            return [full]
        chain = [self._chain.get(v) for v in range(have + 1, version + 1)]
        if all(chain) and sum(len(c) for c in chain if c) < len(full):
            return [c for c in chain if c]
        return [full]

    def _whole_payload(self, version: int, whole: Callable[[], bytes]) -> bytes:
        if self._whole is None or self._whole[0] != version:
            self._whole = (version, whole())
        return self._whole[1]
