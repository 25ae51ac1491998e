"""RMM managed memory really backs the model, and the guard refuses before allocating."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_model_and_kv_tensors_live_in_rmm_managed_memory():
    result = run_isolated("""
        import ctypes, json, asyncio
        from deployments.config import AppArgs
        from deployments.platform import detect_platform
        from deployments.memory import setup_memory
        args = AppArgs.model_validate({"memory": {"mode": "managed"}, "replica": {"num_gpus": 1},
                                       "model": {"dtype": "float32"},
                                       "kv_cache": {"budget_bytes": "256MiB"}})
        platform = detect_platform()
        memory = setup_memory(args.memory, platform)
        import torch
        before = memory.rmm_statistics().current_bytes
        from deployments.engine.hf_engine import HFEngine
        from deployments.engine import GenerationRequest, SamplingParams
        engine = HFEngine(args, memory)
        after_load = memory.rmm_statistics().current_bytes
        weights = engine.weights_bytes
        ptr = next(engine.model.parameters()).data_ptr()
        cuda = ctypes.CDLL("libcuda.so.1")
        managed = ctypes.c_int(0)
        status = cuda.cuPointerGetAttribute(ctypes.byref(managed), 8, ctypes.c_uint64(ptr))
        from deployments.model_files import resolve_model_dir
        from deployments.tokenizer import TextTokenizer
        tokenizer = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
        async def go():
            ids = tokenizer.encode_chat([{"role": "user", "content": "hello " * 50}])
            req = GenerationRequest("r", "u1", ids, SamplingParams(max_tokens=8, temperature=0))
            async for _ in engine.generate(req):
                pass
        asyncio.run(go())
        snap = memory.snapshot()
        print("RESULT " + json.dumps({
            "before": before, "after_load": after_load, "weights": weights,
            "peak": memory.rmm_statistics().peak_bytes, "status": status,
            "is_managed": managed.value, "backend": torch.cuda.memory.get_allocator_backend(),
            "free": snap.free_unified_memory_bytes, "capacity": snap.capacity_bytes,
            "used": snap.used_bytes, "kv": engine.stats().kv_cache_bytes,
            "plan": memory.plan.reason}))
    """)
    assert result["backend"] == "pluggable"  # PyTorch allocates through RMM
    assert result["after_load"] - result["before"] >= result["weights"]  # statistics moved
    assert result["status"] == 0 and result["is_managed"] == 1  # the weights are managed memory
    assert result["peak"] >= result["after_load"] and result["kv"] > 0
    assert result["free"] == min(result["capacity"] - result["used"], result["free"])
    assert result["free"] < result["capacity"] - result["weights"]


def test_guard_refuses_an_oversize_managed_pool_before_allocating_anything():
    result = run_isolated("""
        import json
        import rmm
        from deployments.config import MemoryConfig
        from deployments.memory import OversubscriptionError, setup_memory
        from deployments.platform import detect_platform
        platform = detect_platform()
        free_before, total = rmm.mr.available_device_memory()
        oversize = free_before + 8 * 2**30  # never allocated: the guard must refuse first
        try:
            setup_memory(MemoryConfig(mode="managed", pool_size_bytes=oversize), platform)
            refused, message = False, ""
        except OversubscriptionError as exc:
            refused, message = True, str(exc)
        free_after, _ = rmm.mr.available_device_memory()
        import torch
        print("RESULT " + json.dumps({
            "kind": platform.kind, "refused": refused, "message": message,
            "resource": type(rmm.mr.get_current_device_resource()).__name__,
            "backend": torch.cuda.memory.get_allocator_backend(),
            "free_before": free_before, "free_after": free_after}))
    """)
    if result["kind"] == "grace":
        pytest.skip("coherent node: a pool beyond HBM is allowed there")
    assert result["refused"] and "hang" in result["message"]
    assert result["resource"] == "CudaMemoryResource"  # RMM left as it was
    assert result["backend"] == "native"  # PyTorch's allocator untouched
    assert abs(result["free_after"] - result["free_before"]) < 64 * 2**20
