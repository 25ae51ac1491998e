"""The staging ring and the paged engine's chunked export and import on a GPU
(engine/paged/staging_ring.py, cache_transfer.py): device bytes out through pinned chunks and
back into other pages, byte for byte, faster than a copy out of pageable memory; and a user
moved between two engines in chunks of a few pages lands byte for byte (in one import, or
chunk by chunk in reverse order, as a pipelined move's calls may arrive)."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_device_bytes_round_trip_through_pinned_chunks_byte_for_byte():
    result = run_isolated("""
        import json, random, time
        import numpy as np, torch
        from deployments.engine.paged.staging_ring import StagingRing
        rng = random.Random(0)
        size = 1 << 30
        src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda")
        # scattered runs of odd lengths, shuffled; a last partial chunk
        cuts = sorted(rng.sample(range(1, size), 15))
        edges = [0, *cuts, size]
        runs = [(edges[i], edges[i + 1] - edges[i]) for i in range(len(edges) - 1)]
        rng.shuffle(runs)
        ring = StagingRing(torch.device("cuda"), slot_bytes=(64 << 20) + 4097)
        pinned = all(s.is_pinned() for s in ring.slots)
        out = ring.read(src, runs, lambda chunk: chunk.copy())
        torch.cuda.synchronize()
        data = np.concatenate(out.pieces)
        want = torch.cat([src[o : o + n] for o, n in runs]).cpu().numpy()
        same_out = bool(np.array_equal(data, want))
        pieces = np.split(data, sorted(rng.sample(range(1, size), 6)))
        for p in pieces:
            p.flags.writeable = False
        dst = torch.zeros(size, dtype=torch.uint8, device="cuda")  # the same scattered runs
        torch.cuda.synchronize()
        began = time.perf_counter()
        times = ring.write(pieces, dst, runs)
        write_s = time.perf_counter() - began  # returns with every byte in place
        expect = torch.from_numpy(data).cuda()
        same_in = bool(torch.equal(torch.cat([dst[o : o + n] for o, n in runs]), expect))
        print("RESULT " + json.dumps({"pinned": pinned, "same_out": same_out,
            "same_in": same_in, "chunks": times.chunks, "device_s": times.device_s,
            "out": out.times.as_dict("out_"), "in": times.as_dict("in_"),
            "write_gb_s": size / write_s / 1e9}))
    """)
    assert result["pinned"] and result["same_out"] and result["same_in"], result
    assert result["chunks"] == -(-(1 << 30) // ((64 << 20) + 4097))
    assert result["device_s"] > 0
    assert result["write_gb_s"] > 8, result  # a copy out of pageable memory ran at ~5.6


def test_a_user_moved_in_chunks_of_a_few_pages_lands_byte_for_byte_on_gpu():
    result = run_isolated("""
        import asyncio, json, pickle, random
        import torch
        from deployments.config import AppArgs
        from deployments.engine import GenerationRequest, SamplingParams
        from deployments.engine.paged.engine import PagedEngine
        from deployments.memory import setup_memory
        from deployments.platform import detect_platform
        page = 16 * 2048  # tiny-llama, float32: 16-token pages
        memory = setup_memory(AppArgs.model_validate({"memory": {"mode": "managed",
            "pool_size_bytes": "2GiB"}, "replica": {"num_gpus": 1}}).memory,
            detect_platform(), torch_allocator="native")
        def make():
            return PagedEngine(AppArgs.model_validate({"model": {"dtype": "float32"},
                "memory": {"mode": "managed", "pool_size_bytes": "2GiB"},
                "replica": {"num_gpus": 1},
                "kv_cache": {"budget_bytes": 200 * page},
                "cache_moves": {"chunk_bytes": 3 * page}}), memory)
        sender, receiver = make(), make()
        rng = random.Random(0)
        async def turn(eng, user, prompt):
            req = GenerationRequest("r", user, prompt, SamplingParams(4, temperature=0.0))
            async for _ in eng.generate(req):
                pass
        def user_bytes(eng, key):
            pages = eng.cache._users[key].pages
            return torch.cat([eng.pool.buffer[p].reshape(-1).view(torch.uint8) for p in pages])
        asyncio.run(turn(receiver, "there", [rng.randrange(3, 380) for _ in range(70)]))
        same, sizes = [], []
        chunk = sender._transfer.ring.slot_bytes // sender._transfer.page_bytes
        for i, length in enumerate((137, 61, 250)):  # 9, 4 and 16 pages: partial last chunks
            asyncio.run(turn(sender, f"u{i}", [rng.randrange(3, 380) for _ in range(length)]))
        for i in range(3):
            export = pickle.loads(pickle.dumps(sender.export_user(f"u{i}")))
            sizes.append([n // sender._transfer.page_bytes for n in export.sizes])
            if i < 2:
                assert receiver.import_user(export) is not None
            else:  # pipelined: one chunk a call, the last first (position-addressed)
                ticket = receiver.begin_import(export.header())
                pieces = export.arrays()
                for c in reversed(range(len(pieces))):
                    receiver.import_chunks(ticket, c, [pieces[c]])
                assert receiver.finish_import(ticket) is not None
            here, there = user_bytes(sender, f"u{i}"), user_bytes(receiver, f"u{i}")
            same.append(bool(torch.equal(here, there)))
        sender.check_integrity(); receiver.check_integrity()
        print("RESULT " + json.dumps({"same": same, "sizes": sizes, "chunk": chunk}))
    """)
    assert result["same"] == [True, True, True], result
    chunk = result["chunk"]
    assert 1 < chunk < 16, result  # a few pages a chunk: the users take several
    sizes = result["sizes"]
    assert all(s[:-1] == [chunk] * (len(s) - 1) and 0 < s[-1] <= chunk for s in sizes), result
    assert any(len(s) > 2 for s in sizes) and any(s[-1] < chunk for s in sizes), result
