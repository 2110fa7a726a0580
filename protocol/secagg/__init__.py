"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+'s sparse graph, Bell et al., CCS
2020): the aggregator learns the sum of the devices' quantised updates and nothing about any
one of them, and the round survives devices dropping out. Pure functions and two state
machines, no I/O; the MQTT wiring is separate.

    params   SecAggParams: the public parameters of one round (devices, t, k, bits, clip)
    ring     quantisation to Z_{2^k} with headroom for the sum, bit packing, top-k's shared
             index set
    crypto   X25519, HKDF, ChaCha20-Poly1305 for shares, the ChaCha20 mask generator
    shamir   threshold sharing of 16-byte seeds over GF(2^31 - 1)
    graph    the complete graph or SecAgg+'s random k-regular one; connectivity
    wire     the bytes of each stage's message, size-checked on decode
    client   SecAggClient, the device's stages
    server   SecAggServer, the aggregator's stages
    rounds   SecureRound: what both sides derive from a round's announcement (parameters,
             tensor order, top-k's shared index set); the addressing of signed messages
    errors   SecAggError (a message rejected, with a reason), SecAggAbort (the round ends)

docs/secure-aggregation.md says what it protects against and what it does not.
"""

from .client import SecAggClient
from .errors import SECAGG_REASONS, SecAggAbort, SecAggError
from .params import SecAggParams, default_threshold
from .ring import dequantize_sum, from_ring, quantize, ring_bits, shared_indices, to_ring
from .rounds import SecureRound, address, addressed, is_secagg, secure_round
from .server import SecAggServer

__all__ = [
    "SECAGG_REASONS",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "SecureRound",
    "address",
    "addressed",
    "default_threshold",
    "dequantize_sum",
    "from_ring",
    "is_secagg",
    "quantize",
    "ring_bits",
    "secure_round",
    "shared_indices",
    "to_ring",
]
