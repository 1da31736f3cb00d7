"""The runner protocol's messages: every one survives the wire, unchanged and typed."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from lastmile.runtime import protocol as p

SAMPLES = [
    p.Run(3, "seg-in", (("x", "<f4", (2, 4), 0),), "seg-out", 4096, ()),
    p.Run(4, "seg-in", (), "seg-out", 0, None),
    p.OutBuffer(3, "seg-big", 8192),
    p.OutBuffer(3, None, 0, "pool full"),
    p.MemoryQuery(5),
    p.Shrink(6, ("old-seg",)),
    p.Cancel(7),
    p.Stop(),
    p.Phase(p.NO_SEQ, "loading", {"pid": 1}),
    p.Ready(p.NO_SEQ, {"backend": "x"}),
    p.LoadFailed(p.NO_SEQ, "bad file"),
    p.Need(3, 10_000),
    p.Done(3, (("y", "<f4", (2,), 0),), 0.001),
    p.Done(5, None),
    p.Failed(3, "shape mismatch"),
    p.Generate(8, {"prompt": "hi"}),
    p.Accepted(8, 3),
    p.Refused(9, "context_overflow", (10, 20, 16, "max_tokens")),
    p.Tokens(p.NO_SEQ, [(8, "chunk")]),
    p.EngineStats(p.NO_SEQ, {"running": 1}),
    p.Slots(p.NO_SEQ, 2),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    back = p.decode(p.encode(msg))
    assert type(back) is type(msg) and back == msg


def test_every_message_type_is_sampled_and_has_a_seq():
    kinds = {type(m) for m in SAMPLES}
    for union in (p.ToRunner, p.ToDaemon):
        for cls in union.__args__:
            assert cls in kinds, f"{cls.__name__} has no sample"
            assert dataclasses.fields(cls)[0].name == "seq"


HOT = {p.Run, p.Done, p.Tokens}  # built per batch / engine step: slotted but not frozen (speed)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_messages_are_slotted_and_frozen_off_the_hot_path(msg):
    assert not hasattr(msg, "__dict__")
    if type(msg) in HOT:
        return
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.seq = 2  # type: ignore[misc]


def test_unknown_tag_is_refused():
    with pytest.raises(ValueError, match="unknown runner message tag 99"):
        p.decode(pickle.dumps((99, (1,))))
