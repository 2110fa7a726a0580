"""Secure aggregation: the aggregator gets the exact sum of the survivors' quantised updates,
one masked update looks uniform, dropouts at every stage are survived up to the threshold,
and untrusted bytes are refused with a reason."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pytest
from fedge.protocol.secagg import (
    SECAGG_REASONS,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    crypto,
    default_threshold,
    dequantize_sum,
    graph,
    quantize,
    ring,
    ring_bits,
    shared_indices,
    to_ring,
    wire,
)
from fedge.protocol.secagg.client import Stage as ClientStage
from fedge.protocol.secagg.server import Stage as ServerStage
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

pytestmark = pytest.mark.unit


def seeded(seed: int) -> Callable[[int], bytes]:
    return np.random.default_rng(seed).bytes


def make_params(
    n: int,
    *,
    degree: int | None = None,
    length: int = 64,
    threshold: int | None = None,
    seed: int = 0,
    bits: int = 8,
) -> SecAggParams:
    devices = tuple(sorted(f"dev-{i:03d}" for i in range(n)))
    holders = n if degree is None else min(n, degree + 1)
    return SecAggParams(
        fleet="f1",
        round_id=7,
        seed=hashlib.sha256(seed.to_bytes(4, "little")).hexdigest(),
        devices=devices,
        threshold=threshold or default_threshold(holders),
        degree=degree,
        bits=bits,
        clip=0.5,
        length=length,
    )


@dataclass
class Round:
    params: SecAggParams
    clients: dict[str, SecAggClient]
    server: SecAggServer
    inputs: dict[str, np.ndarray]  # signed quantised updates
    sizes: dict[str, int] = field(default_factory=dict)


def start(params: SecAggParams, seed: int = 1) -> Round:
    rng = np.random.default_rng(seed)
    inputs = {
        d: quantize(rng.normal(0, 0.2, params.length), params.clip, params.bits, rng)
        for d in params.devices
    }
    clients = {
        d: SecAggClient(params, d, random_bytes=seeded(seed * 1000 + i))
        for i, d in enumerate(params.devices)
    }
    return Round(params, clients, SecAggServer(params), inputs)


def run(
    params: SecAggParams,
    *,
    no_keys: Collection[str] = (),
    no_shares: Collection[str] = (),
    no_input: Collection[str] = (),
    skip: Collection[str] = (),
    no_unmask: Collection[str] = (),
    seed: int = 1,
) -> tuple[Round, np.ndarray]:
    """One whole round, devices dropping out before the stage named."""
    r = start(params, seed)
    srv, p = r.server, params
    for d, c in r.clients.items():
        if d not in no_keys:
            srv.add_advertise(d, c.advertise())
    for d, msg in srv.close_advertise().items():
        if d not in no_shares:
            srv.add_shares(d, r.clients[d].share_keys(msg))
    for d, msg in srv.close_shares().items():
        r.clients[d].receive_shares(msg)
        if d in skip:
            srv.add_skip(d)
        elif d not in no_input:
            srv.add_masked(d, r.clients[d].masked_input(to_ring(r.inputs[d], p.k)))
    survivors = srv.close_masked()
    for d in sorted(srv.u3):
        if d not in no_unmask:
            srv.add_unmask(d, r.clients[d].unmask(survivors))
    return r, srv.finish()


def plain_sum(r: Round, devices: Collection[str]) -> np.ndarray:
    return np.sum([r.inputs[d] for d in devices], axis=0)


# -- the sum --------------------------------------------------------------------------------


def test_unmasked_sum_equals_the_plain_quantised_sum_exactly() -> None:
    p = make_params(8, length=500)
    r, total = run(p)
    assert r.server.u3 == set(p.devices)
    assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, p.devices))
    floats = dequantize_sum(total, p.k, count=8, max_devices=8, clip=p.clip, bits=p.bits)
    q_max = 2 ** (p.bits - 1) - 1
    assert np.allclose(floats, plain_sum(r, p.devices) * p.clip / q_max)


def test_the_sum_of_extreme_updates_does_not_wrap() -> None:
    # Every device at +clip (or -clip) on every entry: the sum is n * Q, the ring's headroom.
    p = make_params(9, length=4)
    r = start(p)
    q_max = 2 ** (p.bits - 1) - 1
    for i, d in enumerate(p.devices):
        r.inputs[d] = np.array([q_max, -q_max, q_max * (-1) ** i, 0])
    srv = r.server
    for d, c in r.clients.items():
        srv.add_advertise(d, c.advertise())
    for d, msg in srv.close_advertise().items():
        srv.add_shares(d, r.clients[d].share_keys(msg))
    for d, msg in srv.close_shares().items():
        r.clients[d].receive_shares(msg)
        srv.add_masked(d, r.clients[d].masked_input(to_ring(r.inputs[d], p.k)))
    survivors = srv.close_masked()
    for d in p.devices:
        srv.add_unmask(d, r.clients[d].unmask(survivors))
    assert ring.from_ring(srv.finish(), p.k).tolist() == [9 * q_max, -9 * q_max, q_max, 0]
    assert p.k == 8 + 4  # ceil(log2(9)) = 4


def test_a_third_dropping_after_their_masked_input_still_gives_the_exact_sum() -> None:
    p = make_params(12, length=300)
    gone = set(p.devices[:4])  # sent their input, then never answer the unmask
    r, total = run(p, no_unmask=gone)
    assert r.server.u3 == set(p.devices)
    assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, p.devices))


def test_a_third_dropping_before_their_masked_input_gives_the_survivors_exact_sum() -> None:
    p = make_params(12, length=300)
    gone = set(p.devices[1::3])  # shared their keys, never sent an input
    r, total = run(p, no_input=gone)
    survivors = set(p.devices) - gone
    assert r.server.u3 == survivors
    assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, survivors))


def test_dropouts_at_every_stage_and_a_skip_together() -> None:
    p = make_params(15, length=200)
    d = p.devices
    r, total = run(
        p, no_keys={d[0]}, no_shares={d[1]}, no_input={d[2]}, skip={d[3]}, no_unmask={d[4], d[5]}
    )
    survivors = set(d) - {d[0], d[1], d[2], d[3]}
    assert r.server.u3 == survivors and r.server.skipped == {d[3]}
    assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, survivors))


def test_too_few_survivors_abort_the_round_cleanly() -> None:
    p = make_params(9, length=16)  # threshold 5
    with pytest.raises(SecAggAbort) as info:
        run(p, no_input=set(p.devices[:5]))
    assert info.value.reason == "too_few"
    # Enough inputs, but too few answers to the unmask.
    with pytest.raises(SecAggAbort) as info:
        run(p, no_unmask=set(p.devices[:5]))
    assert info.value.reason == "too_few"
    # Too few keys from the start.
    with pytest.raises(SecAggAbort):
        run(p, no_keys=set(p.devices[:5]))


def test_after_an_abort_the_server_takes_nothing_more() -> None:
    p = make_params(4, length=8)
    r = start(p)
    r.server.add_advertise(p.devices[0], r.clients[p.devices[0]].advertise())
    with pytest.raises(SecAggAbort):
        r.server.close_advertise()
    assert r.server.stage is ServerStage.ABORTED
    with pytest.raises(SecAggError) as info:
        r.server.add_advertise(p.devices[1], r.clients[p.devices[1]].advertise())
    assert info.value.reason == "wrong_stage"


# -- what the aggregator sees ---------------------------------------------------------------


def test_one_masked_input_is_indistinguishable_from_uniform() -> None:
    p = make_params(5, length=20_000)  # k = 8 + 3 = 11 bits
    r = start(p)
    seen: dict[str, np.ndarray] = {}
    srv = r.server
    for d, c in r.clients.items():
        srv.add_advertise(d, c.advertise())
    for d, msg in srv.close_advertise().items():
        srv.add_shares(d, r.clients[d].share_keys(msg))
    for d, msg in srv.close_shares().items():
        r.clients[d].receive_shares(msg)
        payload = r.clients[d].masked_input(to_ring(r.inputs[d], p.k))
        seen[d] = ring.unpack(payload[wire.HEADER_BYTES :], p.k, p.length)
        srv.add_masked(d, payload)
    bins = 64  # 2048 ring values in 64 bins of 32: about 312 a bin
    for d in p.devices:
        counts = np.bincount(seen[d] >> (p.k - 6), minlength=bins)
        assert chisquare(counts).pvalue > 1e-4, d
    # The same test tells the unmasked quantised update apart at once.
    plain = to_ring(r.inputs[p.devices[0]], p.k)
    assert chisquare(np.bincount(plain >> (p.k - 6), minlength=bins)).pvalue < 1e-10
    survivors = srv.close_masked()
    for d in p.devices:
        srv.add_unmask(d, r.clients[d].unmask(survivors))
    assert np.array_equal(ring.from_ring(srv.finish(), p.k), plain_sum(r, p.devices))


def test_a_device_never_reveals_both_secrets_of_a_neighbour() -> None:
    p = make_params(6, length=8)
    r, _, fwd = ready_client(p)
    srv = r.server
    for d, msg in fwd.items():
        r.clients[d].receive_shares(msg)
        srv.add_masked(d, r.clients[d].masked_input(to_ring(r.inputs[d], p.k)))
    me = r.clients[p.devices[0]]
    everyone = wire.header(wire.Kind.SURVIVORS, p.round_id) + wire.bitmap([True] * 6)
    answer = me.unmask(everyone)
    assert len(answer) == wire.HEADER_BYTES + 6 * 20  # one share per holder, itself included
    # Asked again with the others "dropped" (for their s seeds): no answer.
    only_me = wire.header(wire.Kind.SURVIVORS, p.round_id) + wire.bitmap([True] + [False] * 5)
    with pytest.raises(SecAggError) as info:
        me.unmask(only_me)
    assert info.value.reason == "wrong_stage"


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ([False, True, True, True, True, True], "bad_bitmap"),  # without the device itself
        ([True, True, False, False, False, False], "too_few"),  # fewer than t of its holders
    ],
)
def test_a_device_refuses_a_survivor_list_that_would_expose_it(
    flags: list[bool], reason: str
) -> None:
    p = make_params(6, length=8)
    r, _, fwd = ready_client(p)
    me = r.clients[p.devices[0]]
    me.receive_shares(fwd[p.devices[0]])
    me.masked_input(to_ring(r.inputs[p.devices[0]], p.k))
    with pytest.raises(SecAggError) as info:
        me.unmask(wire.header(wire.Kind.SURVIVORS, p.round_id) + wire.bitmap(flags))
    assert info.value.reason == reason
    assert me.stage is ClientStage.ABORTED


def test_a_survivor_that_never_shared_keys_is_refused() -> None:
    p = make_params(6, length=8)
    r = start(p)
    srv = r.server
    for d, c in r.clients.items():
        srv.add_advertise(d, c.advertise())
    for d, msg in srv.close_advertise().items():
        if d != p.devices[5]:
            srv.add_shares(d, r.clients[d].share_keys(msg))
    fwd = srv.close_shares()
    me = r.clients[p.devices[0]]
    me.receive_shares(fwd[p.devices[0]])
    me.masked_input(to_ring(r.inputs[p.devices[0]], p.k))
    with pytest.raises(SecAggError) as info:  # devices[5] "survived" without ever sharing
        me.unmask(wire.header(wire.Kind.SURVIVORS, p.round_id) + wire.bitmap([True] * 6))
    assert info.value.reason == "bad_bitmap"


# -- share encryption ------------------------------------------------------------------------


def test_a_tampered_share_ciphertext_is_rejected() -> None:
    p = make_params(5, length=8)
    r = start(p)
    srv = r.server
    for d, c in r.clients.items():
        srv.add_advertise(d, c.advertise())
    keys = srv.close_advertise()
    for d, msg in keys.items():
        out = r.clients[d].share_keys(msg)
        if d == p.devices[0]:  # flip one bit of its first ciphertext (for devices[1])
            out = (
                out[: wire.HEADER_BYTES + 3]
                + bytes([out[wire.HEADER_BYTES + 3] ^ 1])
                + out[wire.HEADER_BYTES + 4 :]
            )
        srv.add_shares(d, out)
    fwd = srv.close_shares()
    victim = r.clients[p.devices[1]]
    with pytest.raises(SecAggError) as info:
        victim.receive_shares(fwd[p.devices[1]])
    assert info.value.reason == "bad_ciphertext"
    assert victim.stage is ClientStage.ABORTED
    r.clients[p.devices[2]].receive_shares(fwd[p.devices[2]])  # the others are unaffected


def test_a_ciphertext_moved_to_another_receiver_or_round_is_rejected() -> None:
    a, b = crypto.encryption_key(seeded(1)), crypto.encryption_key(seeded(2))
    shared = crypto.agree(a, crypto.public_bytes(b))
    assert shared == crypto.agree(b, crypto.public_bytes(a))
    ctx = crypto.round_context("f1", 7, bytes(32))
    ct = crypto.encrypt_share(shared, ctx, "a", "b", b"secret shares")
    assert crypto.decrypt_share(shared, ctx, "a", "b", ct) == b"secret shares"
    for args in [
        (ctx, "a", "c"),  # another receiver
        (ctx, "b", "a"),  # the other direction
        (crypto.round_context("f1", 8, bytes(32)), "a", "b"),  # another round
        (crypto.round_context("f2", 7, bytes(32)), "a", "b"),  # another fleet
    ]:
        with pytest.raises(SecAggError, match="bad_ciphertext"):
            crypto.decrypt_share(shared, *args, ct)


def test_forwarded_shares_swapped_between_senders_are_rejected() -> None:
    p = make_params(5, length=8)
    r, _, shares = ready_client(p)
    fwd = shares[p.devices[0]]
    head = wire.HEADER_BYTES + 1
    first, second = fwd[head : head + 56], fwd[head + 56 : head + 112]
    swapped = fwd[:head] + second + first + fwd[head + 112 :]
    with pytest.raises(SecAggError, match="bad_ciphertext"):
        r.clients[p.devices[0]].receive_shares(swapped)


# -- SecAgg+'s sparse graph ------------------------------------------------------------------


def test_the_sparse_graph_is_regular_symmetric_and_fixed_by_the_seed() -> None:
    devices = [f"d{i:02d}" for i in range(30)]
    g = graph.neighbours(devices, b"s" * 32, 6)
    assert all(len(g[d]) == 6 and d not in g[d] for d in devices)
    assert all(u in g[v] for u in devices for v in g[u])
    assert g == graph.neighbours(devices, b"s" * 32, 6)
    assert g != graph.neighbours(devices, b"t" * 32, 6)
    assert graph.connected(devices, g)
    complete = graph.neighbours(devices, b"s" * 32, None)
    assert all(len(complete[d]) == 29 for d in devices)
    with pytest.raises(ValueError, match="even"):
        graph.neighbours(devices, b"s" * 32, 5)


def tolerable_dropouts(p: SecAggParams, rng: np.random.Generator) -> list[str]:
    """As many devices as can drop, in random order, while every device keeps t holders."""
    out: list[str] = []
    for d in rng.permutation(p.devices).tolist():
        trial = {*out, d}
        if all(sum(h not in trial for h in p.holders(u)) >= p.threshold for u in p.devices):
            out.append(d)
    return out


def test_sparse_rounds_survive_dropouts_up_to_their_tolerance() -> None:
    p = make_params(40, degree=8, length=100)  # 9 holders a device, threshold 5
    assert p.threshold == 5
    rng = np.random.default_rng(3)
    for trial in range(3):
        dropouts = tolerable_dropouts(p, rng)
        assert len(dropouts) >= 10  # a quarter of the round
        gone, late = set(dropouts[::2]), set(dropouts[1::2])
        r, total = run(p, no_input=gone, no_unmask=late, seed=trial + 2)
        survivors = set(p.devices) - gone
        assert r.server.u3 == survivors
        assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, survivors))


def test_a_sparse_round_beyond_its_tolerance_aborts() -> None:
    p = make_params(40, degree=8, length=16)
    victim = p.devices[0]
    # Five of the victim's eight neighbours drop before the input: 4 of its 9 holders are
    # left (itself and three), under the threshold of 5.
    gone = set(p.graph[victim][:5])
    with pytest.raises(SecAggAbort) as info:
        run(p, no_input=gone)
    assert info.value.reason == "too_few"


def test_a_split_survivor_graph_aborts_before_any_unmasking() -> None:
    # A ring (degree 2, threshold 2 of 3 holders): two survivors far apart are not connected.
    p = make_params(8, degree=2, length=8, threshold=2)
    ring_order = graph.ring_order(p.devices, p.seed_bytes)
    keep = {ring_order[0], ring_order[1], ring_order[4], ring_order[5]}
    with pytest.raises(SecAggAbort) as info:
        run(p, no_input=set(p.devices) - keep)
    assert info.value.reason == "disconnected"


# -- untrusted bytes --------------------------------------------------------------------------


def advertised(p: SecAggParams) -> tuple[Round, bytes]:
    r = start(p)
    return r, r.clients[p.devices[0]].advertise()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:-1], "too_short"),
        (lambda b: b + b"\0", "trailing_bytes"),
        (lambda b: b"XYZ" + b[3:], "bad_magic"),
        (lambda b: b[:4] + bytes([wire.Kind.MASKED]) + b[5:], "wrong_stage"),
        (lambda b: b[:5] + (8).to_bytes(8, "little") + b[13:], "wrong_round"),
        (lambda b: b[:13] + bytes(32) + b[45:], "bad_key"),  # a low-order point
        (lambda b: b[:13] + b[45:] + b[45:], "bad_key"),  # c == s
        (lambda b: b"", "too_short"),
    ],
)
def test_malformed_advertisements_are_refused(
    mutate: Callable[[bytes], bytes], reason: str
) -> None:
    p = make_params(4, length=8)
    r, msg = advertised(p)
    with pytest.raises(SecAggError) as info:
        r.server.add_advertise(p.devices[0], mutate(msg))
    assert info.value.reason == reason
    r.server.add_advertise(p.devices[0], msg)  # the good one is still taken


def test_unknown_and_duplicate_devices_are_refused() -> None:
    p = make_params(4, length=8)
    r, msg = advertised(p)
    with pytest.raises(SecAggError, match="unknown_device"):
        r.server.add_advertise("stranger", msg)
    r.server.add_advertise(p.devices[0], msg)
    with pytest.raises(SecAggError, match="duplicate"):
        r.server.add_advertise(p.devices[0], msg)
    with pytest.raises(SecAggError, match="bad_key"):  # another device replaying its keys
        r.server.add_advertise(p.devices[1], msg)
    with pytest.raises(SecAggError, match="unknown_device"):
        SecAggClient(p, "stranger")


def test_a_key_list_without_the_devices_own_keys_is_refused() -> None:
    p = make_params(4, length=8)
    a = p.devices[0]
    fresh = start(p)
    for d, c in fresh.clients.items():
        fresh.server.add_advertise(d, c.advertise())
    forged = fresh.server.close_advertise()[a]
    with pytest.raises(SecAggError) as info:
        # a's slot (the first) holds other keys than the ones a advertised
        fresh.clients[a].share_keys(forged[:14] + bytes(63) + b"\x09" + forged[78:])
    assert info.value.reason == "bad_keylist"


def test_a_masked_input_of_the_wrong_length_is_refused() -> None:
    p = make_params(4, length=10)  # k = 10: 100 bits, 13 bytes
    r, _, fwd = ready_client(p)
    srv = r.server
    d = p.devices[0]
    r.clients[d].receive_shares(fwd[d])
    good = r.clients[d].masked_input(to_ring(r.inputs[d], p.k))
    assert len(good) == wire.HEADER_BYTES + 13
    for bad, reason in [(good[:-1], "too_short"), (good + b"\0", "trailing_bytes")]:
        with pytest.raises(SecAggError) as info:
            srv.add_masked(d, bad)
        assert info.value.reason == reason
    with pytest.raises(SecAggError, match="unknown_device"):
        srv.add_masked("stranger", good)
    srv.add_masked(d, good)
    with pytest.raises(SecAggError, match="duplicate"):
        srv.add_masked(d, good)
    with pytest.raises(SecAggError, match="duplicate"):
        srv.add_skip(d)


@given(st.binary(max_size=300), st.sampled_from(["advertise", "shares"]))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_raise_nothing_but_secagg_error(data: bytes, stage: str) -> None:
    p = make_params(3, length=8)
    srv = SecAggServer(p)
    try:
        if stage == "advertise":
            srv.add_advertise(p.devices[0], data)
        else:
            srv.stage = ServerStage.SHARES
            srv.u1 = frozenset(p.devices)
            srv.add_shares(p.devices[0], data)
    except SecAggError as exc:
        assert exc.reason in SECAGG_REASONS


def test_params_are_checked() -> None:
    base = make_params(4).model_dump()
    for change in [
        {"devices": ("b", "a", "c", "d")},  # not sorted
        {"devices": ("a", "a", "b", "c")},  # repeated
        {"threshold": 5},  # more than the holders
        {"threshold": 1},
        {"degree": 3},  # odd
        {"seed": "00" * 31},
        {"seed": "AB" * 32},  # upper case: one spelling only
        {"bits": 30},  # 30 + 2 > 32 bits
        {"clip": 0.0},
        {"length": 0},
    ]:
        with pytest.raises(ValueError):
            SecAggParams(**{**base, **change})


# -- the ring, the generator, top-k ---------------------------------------------------------


def test_the_mask_generator_is_the_rfc_8439_chacha20_keystream() -> None:
    # RFC 8439 A.1 test vector 1: all-zero key and nonce, counter 0; keystream 76 b8 e0 ad ...
    words = crypto.prg(bytes(32), 4, 32)
    assert words.tolist() == [0xADE0B876, 0x903DF1A0, 0xE56A5D40, 0x28BD8653]
    assert crypto.prg(bytes(32), 4, 12).tolist() == [w & 0xFFF for w in words.tolist()]


def test_quantisation_is_clipped_bounded_and_unbiased() -> None:
    rng = np.random.default_rng(0)
    x = np.array([-3.0, -0.5, -0.1, 0.0, 0.123, 0.5, 2.0])
    q = np.stack([quantize(x, 0.5, 8, rng) for _ in range(4000)])
    assert q.min() >= -127 and q.max() <= 127
    assert (q[:, 0] == -127).all() and (q[:, -1] == 127).all()  # clipped
    mean = q.mean(axis=0) * 0.5 / 127
    assert np.allclose(mean[1:-1], x[1:-1], atol=0.002)  # E[dequantised] = x inside the range


@given(st.integers(1, 32), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_pack_round_trip(k: int, count: int, seed: int) -> None:
    values = (
        np.random.default_rng(seed).integers(0, 1 << k, count, dtype=np.uint64).astype(np.uint32)
    )
    data = ring.pack(values, k)
    assert len(data) == ring.packed_size(count, k) == (count * k + 7) // 8
    assert np.array_equal(ring.unpack(data, k, count), values)


def test_ring_bits_and_the_sum_back_to_floats() -> None:
    assert [ring_bits(8, n) for n in (1, 2, 10, 100, 1000)] == [8, 9, 12, 15, 18]
    with pytest.raises(ValueError, match="32"):
        ring_bits(24, 1 << 9)
    total = to_ring(np.array([-254, 254, 0]), 9)
    out = dequantize_sum(total, 9, count=2, max_devices=2, clip=1.0, bits=8)
    assert out.tolist() == [-2.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        dequantize_sum(total, 9, count=3, max_devices=2, clip=1.0, bits=8)


def test_top_k_uses_one_shared_index_set_per_round() -> None:
    a = shared_indices(b"r" * 32, 50_000, 1000)
    assert a.size == 1000 and np.all(np.diff(a) > 0) and a.max() < 50_000
    assert np.array_equal(a, shared_indices(b"r" * 32, 50_000, 1000))
    assert np.intersect1d(a, shared_indices(b"q" * 32, 50_000, 1000)).size < 100
    # A top-k round is a round over the shared entries: the sum lands on those positions.
    p = make_params(5, length=a.size)
    r, total = run(p)
    dense = np.zeros(50_000, np.int64)
    dense[a] = ring.from_ring(total, p.k)
    assert np.array_equal(dense[a], plain_sum(r, p.devices))


@pytest.mark.parametrize("degree", [None, 4])
def test_round_bytes_are_the_messages_sizes(degree: int | None) -> None:
    p = make_params(9, degree=degree, length=33)
    r = start(p)
    me = p.devices[3]
    sizes: dict[str, int] = {}
    srv = r.server
    for d, c in r.clients.items():
        msg = c.advertise()
        sizes["advertise"] = len(msg)
        srv.add_advertise(d, msg)
    for d, msg in srv.close_advertise().items():
        out = r.clients[d].share_keys(msg)
        if d == me:
            sizes["keys"], sizes["shares"] = len(msg), len(out)
        srv.add_shares(d, out)
    for d, msg in srv.close_shares().items():
        r.clients[d].receive_shares(msg)
        out = r.clients[d].masked_input(to_ring(r.inputs[d], p.k))
        if d == me:
            sizes["forward"], sizes["masked"] = len(msg), len(out)
        srv.add_masked(d, out)
    survivors = srv.close_masked()
    sizes["survivors"] = len(survivors)
    for d in p.devices:
        out = r.clients[d].unmask(survivors)
        if d == me:
            sizes["unmask"] = len(out)
        srv.add_unmask(d, out)
    srv.finish()
    assert sizes == wire.round_bytes(p.holders_count, 9, 33, p.k)


def ready_client(p: SecAggParams) -> tuple[Round, dict[str, bytes], dict[str, bytes]]:
    """A round whose clients all advertised; the key lists and forwarded shares."""
    r = start(p)
    for d, c in r.clients.items():
        r.server.add_advertise(d, c.advertise())
    keys = r.server.close_advertise()
    for d, msg in keys.items():
        r.server.add_shares(d, r.clients[d].share_keys(msg))
    return r, keys, r.server.close_shares()


@given(st.binary(max_size=400), st.sampled_from(["keys", "forward", "survivors"]))
@settings(max_examples=150, deadline=None)
def test_a_device_takes_arbitrary_bytes_with_nothing_but_secagg_error(
    data: bytes, stage: str
) -> None:
    p = make_params(3, length=8)
    me = p.devices[0]
    if stage == "keys":
        client = SecAggClient(p, me, random_bytes=seeded(0))
        client.advertise()
        call: Callable[[bytes], object] = client.share_keys
    else:
        r, _, fwd = ready_client(p)
        client = r.clients[me]
        call = client.receive_shares
        if stage == "survivors":
            client.receive_shares(fwd[me])
            client.masked_input(to_ring(r.inputs[me], p.k))
            call = client.unmask
    try:
        call(data)
    except SecAggError as exc:
        assert exc.reason in SECAGG_REASONS
        assert client.stage is ClientStage.ABORTED


@pytest.mark.parametrize("degree", [None, 4])
def test_any_dropout_pattern_gives_the_exact_sum_or_a_clean_abort(degree: int | None) -> None:
    # 40 random rounds of 7 devices, each device dropping at some stage with probability 0.3.
    p = make_params(7, degree=degree, length=16)
    rng = np.random.default_rng(11)
    stages = ["keys", "shares", "input", "skip", "unmask"]
    exact = 0
    for trial in range(40):
        fate = rng.choice([*stages, "stays"], size=7, p=[0.06] * 5 + [0.7])
        where = {s: {d for d, f in zip(p.devices, fate, strict=True) if f == s} for s in stages}
        try:
            r, total = run(
                p,
                no_keys=where["keys"],
                no_shares=where["shares"],
                no_input=where["input"],
                skip=where["skip"],
                no_unmask=where["unmask"],
                seed=trial,
            )
        except SecAggAbort as exc:
            assert exc.reason in {"too_few", "disconnected"}
            continue
        gone = where["keys"] | where["shares"] | where["input"] | where["skip"]
        assert r.server.u3 == set(p.devices) - gone
        assert np.array_equal(ring.from_ring(total, p.k), plain_sum(r, r.server.u3))
        exact += 1
    assert exact >= 20  # most rounds finish; the rest abort cleanly


def test_a_bad_unmask_share_aborts_instead_of_giving_a_wrong_sum() -> None:
    p = make_params(7, length=16)  # threshold 4 of 7 answers: two sets of 4 to compare
    r, _, fwd = ready_client(p)
    srv = r.server
    for d, msg in fwd.items():
        r.clients[d].receive_shares(msg)
        srv.add_masked(d, r.clients[d].masked_input(to_ring(r.inputs[d], p.k)))
    survivors = srv.close_masked()
    for i, d in enumerate(p.devices):
        out = r.clients[d].unmask(survivors)
        if i == 0:  # the first share (of devices[0]'s own b) changed by one
            share = int.from_bytes(out[13:17], "little")
            out = out[:13] + ((share + 1) % (2**31 - 1)).to_bytes(4, "little") + out[17:]
        srv.add_unmask(d, out)
    with pytest.raises(SecAggAbort) as info:
        srv.finish()
    assert info.value.reason == "bad_share"


def test_params_travel_as_json() -> None:
    p = make_params(5, degree=2)
    again = SecAggParams.model_validate_json(p.model_dump_json())
    assert again == p and again.graph == p.graph and again.context == p.context
