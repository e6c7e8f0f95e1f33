"""The site's side of secure aggregation (SecAgg+): a ClientApp mod around the train handler.

With ``aggregation = "secagg+"`` every train message carries a ``secagg`` ConfigRecord naming
its stage; the server sends four per round (server/secagg.py):

1. ``setup``: the round's size and threshold; the site refuses fewer than 3 sites or a threshold
   of half its shares or less, makes two fresh key pairs (mask agreement, share encryption) and
   answers with the public halves (compressed points, 49 bytes each);
2. ``share-keys``: its neighbours' public keys; it draws a private mask seed b, splits b and its
   mask private key into Shamir shares (Flower's), and answers one share pair per neighbour,
   each encrypted to it (ECDH + Fernet, Flower's; the mask key shared as its raw 48-byte scalar,
   each token sent as raw bytes, not base64);
3. ``collect``: the train message itself plus the shares meant for it; it keeps them, lets the
   train handler run (``call_next``: the plain round, untouched), and answers only its vector
   (fedllm.secagg.encode: Δ, weight, counts and DP numbers) masked with PRG(b) and ±PRG(s_ij)
   for every neighbour j that shared with it, mod 2^b (b = ``modulus_bits(K)``, 25 for 5 sites),
   packed at b bits a coordinate. No adapter and no metric leaves in the clear; the
   fraction of clipped coordinates is printed to the site's own log;
4. ``unmask``: the lists of active and dropped neighbours; it answers its b-shares of the active
   and its key shares of the dropped, once per round, and refuses when the lists overlap (both
   shares of one site would unmask its vector), leave its neighbourhood, omit itself or are
   shorter than the threshold.

A train message without the record in a secagg+ run (or with it in a plain run) is refused. The
protocol state lives in ``context.state`` between the stages; a refusal raises
``SecAggRefusal``, which ``failures_as_codes`` turns into the code ``site-refused-secagg``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import generate_key_pairs

from clients.policy import SitePolicyError
from fedllm.config import settings_from
from fedllm.contract import SecAggKey as K
from fedllm.secagg import (
    MAX_SITES,
    MIN_SITES,
    SecAggError,
    SecAggSettings,
    encode,
    fernet_token,
    flatten,
    get_list,
    get_one,
    load_private,
    load_public,
    mask,
    modulus_bits,
    pack,
    private_bytes,
    public_bytes,
    raw_token,
    reduce,
)

RECORD = K.RECORD
STATE = "secagg-state"  # the site's own record of the round between stages (never sent)
STAGES = K.STAGES


class SecAggRefusal(SitePolicyError):
    """The site will not take this secure-aggregation step; nothing of its data was sent."""

    def __init__(self, message: str):
        super().__init__("site-refused-secagg", message)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SecAggRefusal(message)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: answer the four stages of a secagg+ round; pass everything else through."""
    is_train = msg.metadata.message_type.startswith("train")
    config = msg.content.config_records.get(RECORD) if is_train else None
    enabled = SecAggSettings.from_run_config(context.run_config).enabled
    if not is_train or (config is None and not enabled):
        return call_next(msg, context)
    if config is None:
        raise SecAggRefusal("this run aggregates securely: a plain train reply is refused")
    _require(enabled, "a secure-aggregation message in a run that is not secagg+")
    try:
        content, new_state = _stage(msg, context, config, call_next)
    except SecAggError as err:  # a malformed field, key or share: refused, nothing of the data sent
        raise SecAggRefusal(str(err)) from err
    if new_state is None:
        context.state.config_records.pop(STATE, None)
    else:
        context.state.config_records[STATE] = new_state
    return Message(content, reply_to=msg)


Handler = Callable[
    [Message, Context, ConfigRecord, ConfigRecord, ClientAppCallable], tuple[RecordDict, ConfigRecord | None]
]


def _stage(
    msg: Message, context: Context, config: ConfigRecord, call_next: ClientAppCallable
) -> tuple[RecordDict, ConfigRecord | None]:
    """Check the stage's order and round against the kept state; run its handler."""
    stage = get_one(config, K.STAGE, str)
    state = context.state.config_records.get(STATE)
    expected = "setup" if state is None else STAGES[STAGES.index(get_one(state, "stage", str)) + 1]
    _require(stage == expected or stage == "setup", f"stage {stage!r} out of order (expected {expected!r})")
    if stage == "setup":
        return _setup(config)
    if state is None:  # unreachable: a stage after setup is expected only with a kept state
        raise SecAggRefusal(f"stage {stage!r} before setup")
    _require(get_one(config, K.ROUND, int) == get_one(state, "round", int), "a stage of another round")
    handlers: dict[str, Handler] = {"share-keys": _share_keys, "collect": _collect, "unmask": _unmask}
    return handlers[stage](msg, context, config, state, call_next)


def _setup(config: ConfigRecord) -> tuple[RecordDict, ConfigRecord]:
    """Stage 1: check the round's shape; two fresh key pairs; answer the public keys."""
    sites, shares, threshold = (get_one(config, k, int) for k in (K.SITES, K.NUM_SHARES, K.THRESHOLD))
    _require(MIN_SITES <= sites <= MAX_SITES, f"secure aggregation needs {MIN_SITES}..{MAX_SITES} sites")
    _require(shares <= sites and threshold <= shares, "more shares than sites, or threshold above shares")
    _require(2 * threshold > shares, "a threshold of half the shares or less")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    new = ConfigRecord(
        {
            "stage": "setup",
            "round": get_one(config, K.ROUND, int),
            "threshold": threshold,
            "bits": modulus_bits(sites),
            "sk1": private_bytes(sk1),
            "sk2": private_bytes(sk2),
            "pk1": public_bytes(pk1),
            "pk2": public_bytes(pk2),
        }
    )
    return RecordDict({RECORD: ConfigRecord({K.PK1: new["pk1"], K.PK2: new["pk2"]})}), new


def _share_keys(
    msg: Message, context: Context, config: ConfigRecord, state: ConfigRecord, call_next: ClientAppCallable
) -> tuple[RecordDict, ConfigRecord]:
    """Stage 2: Shamir-share the mask seed b and the mask key; encrypt one pair per neighbour."""
    me = msg.metadata.dst_node_id
    nids, pk1s, pk2s = (
        get_list(config, K.NIDS, int),
        get_list(config, K.PK1S, bytes),
        get_list(config, K.PK2S, bytes),
    )
    _require(len(nids) == len(set(nids)) == len(pk1s) == len(pk2s), "malformed neighbour list")
    _require(len(set(pk1s + pk2s)) == 2 * len(nids), "two neighbours with the same public key")
    _require(me in nids, "the neighbour list omits this site")
    i = nids.index(me)
    mine = (get_one(state, "pk1", bytes), get_one(state, "pk2", bytes))
    _require((pk1s[i], pk2s[i]) == mine, "this site's public keys were altered")
    threshold = get_one(state, "threshold", int)
    _require(len(nids) >= threshold, "fewer neighbours than the threshold")
    seed = os.urandom(32)
    b_shares = create_shares(seed, threshold, len(nids))
    sk_shares = create_shares(get_one(state, "sk1", bytes), threshold, len(nids))
    sk2 = load_private(get_one(state, "sk2", bytes))
    dsts, ctxts = [], []
    for j, nid in enumerate(nids):
        if nid != me:
            key = generate_shared_key(sk2, load_public(pk2s[j]))
            plaintext = share_keys_plaintext_concat(me, nid, b_shares[j], sk_shares[j])
            ctxts.append(raw_token(encrypt(key, plaintext)))
            dsts.append(nid)
    new = ConfigRecord(
        {
            **state,
            "stage": "share-keys",
            "seed": seed,
            "nids": nids,
            "pk1s": pk1s,
            "pk2s": pk2s,
            "share-srcs": [me],
            "b-shares": [b_shares[i]],
            "sk-shares": [sk_shares[i]],
        }
    )
    return RecordDict({RECORD: ConfigRecord({K.DSTS: dsts, K.CTXTS: ctxts})}), new


def _receive_shares(me: int, config: ConfigRecord, state: ConfigRecord) -> ConfigRecord:
    """Decrypt the shares the neighbours sent this site; check who sent them to whom."""
    nids, pk2s = get_list(state, "nids", int), get_list(state, "pk2s", bytes)
    srcs, ctxts = get_list(config, K.SRCS, int), get_list(config, K.CTXTS, bytes)
    _require(len(srcs) == len(set(srcs)) == len(ctxts), "malformed share list")
    _require(len(srcs) + 1 >= get_one(state, "threshold", int), "fewer neighbours left than the threshold")
    sk2 = load_private(get_one(state, "sk2", bytes))
    got = get_list(state, "share-srcs", int)
    b_shares, sk_shares = get_list(state, "b-shares", bytes), get_list(state, "sk-shares", bytes)
    for src, ctxt in zip(srcs, ctxts, strict=True):
        _require(src in nids and src != me, f"shares from {src}, not a neighbour")
        key = generate_shared_key(sk2, load_public(pk2s[nids.index(src)]))
        sender, receiver, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, fernet_token(ctxt)))
        _require((sender, receiver) == (src, me), "a share addressed to another pair of sites")
        got.append(src)
        b_shares.append(b_share)
        sk_shares.append(sk_share)
    return ConfigRecord({**state, "share-srcs": got, "b-shares": b_shares, "sk-shares": sk_shares})


def masked_vector(vector: np.ndarray, me: int, state: ConfigRecord) -> np.ndarray:
    """``vector`` + PRG(b) ± PRG(s_ij) for each neighbour j that shared (+ when me > j), mod 2^b
    (the round's ``modulus_bits``), as uint32 values < 2^b."""
    out = vector.astype(np.uint32) + mask(get_one(state, "seed", bytes), vector.size)
    nids, pk1s = get_list(state, "nids", int), get_list(state, "pk1s", bytes)
    sk1 = load_private(get_one(state, "sk1", bytes))
    for nid in get_list(state, "share-srcs", int):
        if nid == me:
            continue
        pairwise = mask(generate_shared_key(sk1, load_public(pk1s[nids.index(nid)])), vector.size)
        out = out + pairwise if me > nid else out - pairwise
    return reduce(out, get_one(state, "bits", int))


def _collect(
    msg: Message, context: Context, config: ConfigRecord, state: ConfigRecord, call_next: ClientAppCallable
) -> tuple[RecordDict, ConfigRecord]:
    """Stage 3: keep the shares, train (the plain handler), answer only the masked vector."""
    me = msg.metadata.dst_node_id
    state = _receive_shares(me, config, state)
    glob = {name: array.numpy() for name, array in msg.content.array_records["arrays"].items()}
    del msg.content.config_records[RECORD]  # the train handler sees a plain train message
    reply = call_next(msg, context)
    if reply.has_error():  # the inner code (already a fixed one) reaches the server unchanged
        raise SitePolicyError(str(reply.error.reason), "training failed; the site drops out before masking")
    trained = {name: array.numpy() for name, array in reply.content.array_records["arrays"].items()}
    _require(list(trained) == list(glob), "the trained adapter's names differ from the global one")
    names = list(glob)
    delta = flatten(trained, names) - flatten(glob, names)
    secagg = SecAggSettings.from_run_config(context.run_config)
    clip = secagg.clip(settings_from(context.run_config).resolved())  # auto resolved here, at the edge
    metrics = dict(reply.content.metric_records["metrics"])
    vector, clipped = encode(delta, metrics, clip, secagg.secagg_max_weight)
    print(
        f"[site {context.node_id}] secure round {get_one(state, 'round', int)}: {clipped:.2%} of the "
        f"update's coordinates clipped to ±{clip:g} (kept in this log only)"
    )
    packed = pack(masked_vector(vector, me, state), get_one(state, "bits", int))
    return RecordDict({K.MASKED: ArrayRecord({K.VECTOR: Array(packed)})}), ConfigRecord(
        {**state, "stage": "collect"}
    )


def _unmask(
    msg: Message, context: Context, config: ConfigRecord, state: ConfigRecord, call_next: ClientAppCallable
) -> tuple[RecordDict, None]:
    """Stage 4: b-shares of the active, key shares of the dropped; once; never both of one site."""
    me = msg.metadata.dst_node_id
    active, dead = get_list(config, K.ACTIVE, int), get_list(config, K.DEAD, int)
    _require(not set(active) & set(dead), "a site listed both active and dropped")
    _require(me in active, "this site sent its vector, yet is not listed active")
    shared = get_list(state, "share-srcs", int)
    _require(set(active) | set(dead) <= set(shared), "a listed site never shared with this site")
    _require(len(active) >= get_one(state, "threshold", int), "fewer active sites than the threshold")
    b_shares, sk_shares = get_list(state, "b-shares", bytes), get_list(state, "sk-shares", bytes)
    nids = active + dead
    shares = [b_shares[shared.index(n)] for n in active] + [sk_shares[shared.index(n)] for n in dead]
    return RecordDict({RECORD: ConfigRecord({K.NIDS: nids, K.SHARES: shares})}), None
