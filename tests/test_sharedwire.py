"""Shared-memory slots (swarm/sharedwire.py), pure: what a reader copies is what was written, a slot rewritten or
removed is noticed, tickets that do not fit are refused, nothing is left under /dev/shm."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_distqat.swarm.messages import Malformed, pack, unpack
from lightning_distqat.swarm.sharedwire import (
    SEGMENT_PREFIX, Arena, SharedWireError, SlotReader, host_key, remove_segments_of,
)


def _ours() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")}


TENSORS = [torch.randn(64, 128), torch.arange(5), torch.tensor(3.0), torch.zeros(0, 3),
           torch.tensor([True, False]), torch.randn(7, dtype=torch.bfloat16)]


def test_a_slot_round_trip_is_exact_and_slots_are_reused_then_unlinked():
    arena, reader = Arena(), SlotReader()
    try:
        slot, ticket = arena.write(TENSORS)
        out = reader.read(ticket, 2**30)
        assert [(t.dtype, t.shape) for t in out] == [(t.dtype, t.shape) for t in TENSORS]
        assert all(torch.equal(a, b) for a, b in zip(out, TENSORS))
        arena.release(slot)
        again, _ = arena.write(TENSORS)
        assert again is slot  # a free slot of the size is reused
        assert len(_ours()) == 1
    finally:
        reader.close()
        arena.close()
    assert not _ours()


def test_a_rewritten_or_retired_slot_is_noticed_not_mixed():
    arena, reader = Arena(), SlotReader()
    try:
        slot, old = arena.write(TENSORS)
        arena.release(slot)
        arena.write([t + 1 if t.is_floating_point() else t for t in TENSORS])  # the same slot, written anew
        with pytest.raises(SharedWireError, match="rewritten"):
            reader.read(old, 2**30)
        retired, ticket = arena.write([torch.ones(4096)])
        arena.retire(retired)
        with pytest.raises(SharedWireError, match="gone"):
            reader.read(ticket, 2**30)
    finally:
        reader.close()
        arena.close()
    assert not _ours()


def test_tickets_that_do_not_fit_are_refused():
    arena, reader = Arena(), SlotReader()
    try:
        _, ticket = arena.write([torch.ones(8192)])
        bad = [
            {**ticket, "seg": "torch_123_4"},  # not one of ours
            {**ticket, "seg": ticket["seg"] + "/../x"},
            {**ticket, "key": b"short"},
            {**ticket, "items": [["float32", [8192], 64, 100]]},  # size does not match the shape
            {**ticket, "items": [["float32", [2**30], 64, 2**32]]},  # beyond the segment
            {**ticket, "items": [["object", [1], 64, 8]]},
            {**ticket, "items": [["float32", [-1], 64, -4]]},
            "not a ticket",
        ]
        for ticket_ in bad:
            with pytest.raises(SharedWireError):
                reader.read(ticket_, 2**40)
        with pytest.raises(SharedWireError, match="larger than"):
            reader.read(ticket, 1000)
        assert torch.equal(reader.read(ticket, 2**40)[0], torch.ones(8192))
    finally:
        reader.close()
        arena.close()


def test_small_calls_and_a_full_arena_travel_as_bytes():
    arena = Arena(max_bytes=2**17)
    try:
        assert arena.write([torch.ones(4)]) is None  # below MIN_SHARED_BYTES
        assert arena.write([torch.ones(2**16)]) is None  # 256 KiB: more than the arena may hold
        assert arena.write([torch.ones(2**14)]) is not None
    finally:
        arena.close()


def test_messages_carry_a_ticket_instead_of_bytes_and_only_a_reader_takes_it():
    arena, reader = Arena(), SlotReader()
    try:
        _, ticket = arena.write([torch.randn(100, 100)])
        (message,) = pack(type(_request()), {"shm": ticket})
        with pytest.raises(Malformed, match="shared memory"):
            unpack([message])
        header, tensors = unpack([message], reader)
        assert header == {} and tensors[0].shape == (100, 100)
    finally:
        reader.close()
        arena.close()


def test_remove_segments_of_a_dead_process():
    arena = Arena()
    arena.write([torch.ones(8192)])
    assert _ours()
    remove_segments_of(os.getpid())
    assert not _ours()
    arena.close()  # its segments are gone already: closing still works


def test_host_key_is_stable_in_a_process():
    assert host_key() and host_key() == host_key()


def _request():
    from hivemind.proto import runtime_pb2

    return runtime_pb2.ExpertRequest()
