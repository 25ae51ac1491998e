"""The staging ring (engine/paged/staging_ring.py) on CPU: bytes streamed out of scattered
runs of a buffer in chunks, and pieces of any size streamed into scattered runs, arrive byte
for byte, whatever the chunk, piece and run boundaries (odd sizes, a last partial chunk)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from deployments.engine.paged.staging_ring import StagingRing


def scattered_runs(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """`count` disjoint (offset, length) ranges of odd lengths inside [0, size), shuffled."""
    cuts = sorted(rng.sample(range(1, size), 2 * count - 1))
    edges = [0, *cuts, size]
    runs = [(edges[i], edges[i + 1] - edges[i]) for i in range(0, 2 * count, 2)]
    rng.shuffle(runs)
    return runs


def odd_pieces(rng: random.Random, data: np.ndarray, count: int) -> list[np.ndarray]:
    cuts = sorted(rng.sample(range(1, data.nbytes), count - 1))
    pieces = np.split(data, cuts)
    for piece in pieces:
        piece.flags.writeable = False  # as the object store hands them out
    return pieces


def gathered(buffer: torch.Tensor, runs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([buffer[o : o + n].numpy() for o, n in runs])


@pytest.mark.parametrize("threads", [1, 3])
def test_pieces_of_odd_sizes_land_in_scattered_runs_byte_for_byte(threads):
    rng = random.Random(threads)
    dst = torch.zeros(20_011, dtype=torch.uint8)
    runs = scattered_runs(rng, dst.numel(), 9)
    total = sum(n for _, n in runs)
    data = np.frombuffer(rng.randbytes(total), dtype=np.uint8).copy()
    ring = StagingRing(torch.device("cpu"), slot_bytes=997, threads=threads)
    times = ring.write(odd_pieces(rng, data, 7), dst, runs)
    assert np.array_equal(gathered(dst, runs), data)
    outside = torch.ones_like(dst, dtype=torch.bool)
    for o, n in runs:
        outside[o : o + n] = False
    assert not dst[outside].any()  # nothing written outside the runs
    assert times.chunks == -(-total // 997) and times.device_s == 0.0
    ring.close()


def test_scattered_runs_stream_out_in_chunks_of_at_most_a_slot():
    rng = random.Random(1)
    src = torch.from_numpy(np.frombuffer(rng.randbytes(30_001), dtype=np.uint8).copy())
    runs = scattered_runs(rng, src.numel(), 11)
    ring = StagingRing(torch.device("cpu"), slot_bytes=1_000, slots=2)

    def sink(chunk: np.ndarray) -> np.ndarray:
        return chunk.copy()  # the chunk's memory is the ring's: reused after the call

    streamed = ring.read(src, runs, sink)
    total = sum(n for _, n in runs)
    assert np.array_equal(np.concatenate(streamed.pieces), gathered(src, runs))
    seen = [p.nbytes for p in streamed.pieces]
    assert streamed.sizes == seen and sum(seen) == total
    assert all(n == 1_000 for n in seen[:-1]) and 0 < seen[-1] <= 1_000
    assert streamed.times.chunks == len(seen)


def test_a_round_trip_of_several_mebibytes_through_split_host_copies():
    """Chunks larger than a host-copy part: the copy threads each take a slice."""
    rng = random.Random(2)
    size = 13 * (1 << 20) + 12_345
    src = torch.from_numpy(np.frombuffer(rng.randbytes(size), dtype=np.uint8).copy())
    runs = [(size // 2, size - size // 2), (0, size // 2)]
    ring = StagingRing(torch.device("cpu"), slot_bytes=9 * (1 << 20) + 7, threads=4)
    streamed = ring.read(src, runs, lambda chunk: chunk.copy())
    dst = torch.zeros(size, dtype=torch.uint8)
    back = [(0, size - size // 2), (size - size // 2, size // 2)]
    ring.write(odd_pieces(rng, np.concatenate(streamed.pieces), 3), dst, back)
    assert torch.equal(dst, torch.cat([src[size // 2 :], src[: size // 2]]))


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_a_failing_sink_leaves_the_ring_whole_for_the_next_transfer(slots):
    rng = random.Random(3)
    src = torch.from_numpy(np.frombuffer(rng.randbytes(10_000), dtype=np.uint8).copy())
    ring = StagingRing(torch.device("cpu"), slot_bytes=999, slots=slots)
    calls = []

    def failing(chunk: np.ndarray) -> np.ndarray:
        calls.append(chunk.nbytes)
        if len(calls) == 4:
            raise RuntimeError("the object store is gone")
        return chunk.copy()

    with pytest.raises(RuntimeError, match="object store is gone"):
        ring.read(src, [(0, 10_000)], failing)
    again = ring.read(src, [(5_000, 5_000), (0, 5_000)], lambda chunk: chunk.copy())
    assert np.array_equal(np.concatenate(again.pieces), torch.cat([src[5_000:], src[:5_000]]))


def test_bytes_that_do_not_fill_the_runs_are_refused_before_any_copy():
    ring = StagingRing(torch.device("cpu"), slot_bytes=64)
    dst = torch.zeros(256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="100 bytes arrived for 128"):
        ring.write([np.ones(100, dtype=np.uint8)], dst, [(0, 64), (128, 64)])
    assert not dst.any()
