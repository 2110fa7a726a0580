"""Homomorphic encryption on the device (docs/homomorphic-encryption.md): the global model
arrives encrypted and is decrypted here; the update leaves encrypted (``update.encrypt``).

::

    global: GlobalModelHeader + one uint8 tensor (E_t)  -> open_global -> weights, then the
            checks every model gets (finite, fits the local model)
    round:  TrainingConfig.he and no key                -> skip notice "he_no_key"
            a key and not TrainingConfig.he              -> skip notice "he_required"
    global: a key and a plain model                      -> refused ("he_plain_model")

A device with the key takes encrypted rounds and models only: an aggregator that announced a
plain round (or published a plain model it could not have made) would otherwise get the
device's update in the clear.

Only the device holds the secret key (``[he] key_file``, the fleet's he.secret). TenSEAL
loads when the key does (``fedge.heconfig.load_he_keys``), never for a device without HE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # fedge.protocol.he is imported where used: a device without HE never loads it
    from fedge.protocol.he import HeKeys

SKIP_NO_KEY = "he_no_key"  # the skip notice's reason, and the status's
SKIP_PLAIN = "he_required"
PLAIN_ROUND = (
    "round %d is not encrypted but this device has an [he] key_file: sitting it out (it sends"
    " its updates encrypted only; remove [he] if the fleet no longer uses it)"
)
NO_KEY = (
    "round %d encrypts updates (homomorphic encryption) but this device has no [he] key_file"
    " (the fleet's he.secret): sitting it out"
)


def open_global(
    keys: HeKeys | None, tensors: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The weights of an encrypted global model, in the shapes of ``template`` (the local
    model's weights); HeError with a reason (``no_secret_key`` without a key)."""
    from fedge.protocol.he import HeError, decrypt_model, from_tensors

    if keys is None:
        raise HeError("no_secret_key", "an encrypted global model and no [he] key_file")
    shapes = {name: tuple(np.shape(w)) for name, w in template.items()}
    return decrypt_model(keys, from_tensors(tensors), shapes)


def estimate(weights: Mapping[str, np.ndarray]) -> int:
    """Bytes of an encrypted update of a model of these weights, at most."""
    from fedge.protocol.he import upload_estimate

    return upload_estimate(sum(int(np.size(w)) for w in weights.values()))
