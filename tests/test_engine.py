"""Engine behaviour: progress, cancellation, output dtypes, passthrough, copied buffers, manifest."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.errors import CancelledError, MemoryBudgetError


@pytest.fixture()
def ckpts(tmp_path):
    torch.manual_seed(0)
    base = {f"enc.layers.{i}.mlp.fc1.weight": torch.randn(16, 8, dtype=torch.bfloat16) for i in range(6)}
    base["enc.position_ids"] = torch.arange(10, dtype=torch.int64)
    base["head.weight"] = torch.randn(3, 8, dtype=torch.bfloat16)
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in range(3):
        e = {k: (v + 0.05 * torch.randn_like(v.float()).to(v.dtype)) if v.dtype.is_floating_point else v.clone() for k, v in base.items()}
        save_file(e, str(tmp_path / f"e{t}.safetensors"))
    return tmp_path, base


def _spec(root, **over):
    spec = {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors"), "name": f"task{t}"} for t in range(3)],
            "output": {"uri": str(root / "out")}}
    spec.update(over)
    return spec


def test_progress_events_cover_every_tensor(ckpts):
    root, base = ckpts
    events = []
    merging.merge(_spec(root), progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "inspect" and phases[-1] == "done"
    merge_events = [e for e in events if e.phase == "merge"]
    assert [e.done for e in merge_events] == list(range(len(base) + 1))  # ends at n/n
    assert all(e.total == len(base) for e in merge_events)
    assert {e.key for e in merge_events[:-1]} == set(base)


def test_cancel_leaves_nothing(ckpts):
    root, _ = ckpts
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 4
    with pytest.raises(CancelledError):
        merging.merge(_spec(root), should_cancel=should_cancel)
    assert not (root / "out").exists()
    assert not [p for p in os.listdir(root) if ".partial-" in p]


def test_dtypes_buffers_and_passthrough(ckpts):
    root, base = ckpts
    res = merging.merge(_spec(root, passthrough=["head.*"]))
    out = load_file(str(root / "out" / "model.safetensors"))
    assert out["enc.layers.0.mlp.fc1.weight"].dtype == torch.bfloat16  # auto: the base's dtype
    assert torch.equal(out["enc.position_ids"], base["enc.position_ids"])  # integer buffer copied
    assert torch.equal(out["head.weight"], base["head.weight"])  # passthrough
    rows = {r["key"]: r for r in res.manifest["tensors"]}
    assert rows["head.weight"]["action"] == "copied" and "passthrough" in rows["head.weight"]["reason"]
    assert rows["enc.position_ids"]["action"] == "copied"
    assert rows["enc.layers.0.mlp.fc1.weight"]["action"] == "merged"
    assert res.manifest["coverage"] == {"total": len(base), "merged": 6, "copied": 2}

    merging.merge(_spec(root, output={"uri": str(root / "out32"), "dtype": "float32"}))
    out32 = load_file(str(root / "out32" / "model.safetensors"))
    assert out32["enc.layers.0.mlp.fc1.weight"].dtype == torch.float32
    assert out32["enc.position_ids"].dtype == torch.int64
    # computed in float32 from the bf16 inputs, then cast: the bf16 output is the rounded float32 output
    assert torch.equal(out32["enc.layers.0.mlp.fc1.weight"].to(torch.bfloat16), out["enc.layers.0.mlp.fc1.weight"])


def test_output_directory_is_complete_and_hashed(ckpts):
    root, _ = ckpts
    res = merging.merge(_spec(root))
    names = sorted(os.listdir(root / "out"))
    assert names == ["README.md", "diagnostics.json", "merge.json", "model.safetensors"]
    manifest = json.loads((root / "out" / "merge.json").read_text())
    import hashlib
    for name, info in manifest["files"].items():
        assert hashlib.sha256((root / "out" / name).read_bytes()).hexdigest() == info["sha256"]
    assert [i["name"] for i in manifest["inputs"]] == ["base", "expert 'task0'", "expert 'task1'", "expert 'task2'"]
    for inp in manifest["inputs"]:
        for fname, digest in inp["files"].items():
            assert len(digest) == 64
    card = (root / "out" / "README.md").read_text()
    assert "task_arithmetic" in card and manifest["inputs"][1]["files"]["e0.safetensors"] in card
    assert res.manifest["params"]["alpha"] == 0.5


def test_existing_output_is_refused_then_replaced_with_overwrite(ckpts):
    root, _ = ckpts
    merging.merge(_spec(root))
    before = (root / "out" / "model.safetensors").read_bytes()
    with pytest.raises(merging.MergeError, match="output.uri"):
        merging.merge(_spec(root, params={"alpha": 1.0}))
    assert (root / "out" / "model.safetensors").read_bytes() == before
    merging.merge(_spec(root, params={"alpha": 1.0}, output={"uri": str(root / "out"), "overwrite": True}))
    assert (root / "out" / "model.safetensors").read_bytes() != before
    assert not [p for p in os.listdir(root) if ".old-" in p or ".partial-" in p]


def _esm_spec(root, keys: dict[str, tuple[int, ...]], scale=lambda key: 1) -> dict:
    """A zero base and two random experts (entries scaled by ``scale(key)``), each with 30 random
    calibration inputs for every matrix key."""
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(root / "base.safetensors"))
    experts = []
    for t in range(2):
        save_file({k: scale(k) * torch.randn(s) for k, s in keys.items()}, str(root / f"e{t}.safetensors"))
        save_file({k: torch.randn(30, s[1]) for k, s in keys.items() if len(s) == 2}, str(root / f"c{t}.safetensors"))
        experts.append({"uri": str(root / f"e{t}.safetensors"), "calibration": {"uri": str(root / f"c{t}.safetensors")}})
    return {"method": "esm", "base": {"uri": str(root / "base.safetensors")}, "experts": experts}


def test_esm_spill_is_cleaned_up(tmp_path, monkeypatch):
    import threading

    from merging.methods.esm import Esm
    from merging import heap
    from merging.memory import default_workers
    threads, unmapping = set(), set()
    original = Esm._esd_merge

    def esd_merge(self, job):
        threads.add(threading.current_thread().name)
        unmapping.add(heap.active())
        return original(self, job)
    monkeypatch.setattr(Esm, "_esd_merge", esd_merge)
    torch.manual_seed(0)
    keys = {f"blocks.{i}.mlp.c_fc.weight": (16, 4) for i in range(2)}
    res = merging.merge({**_esm_spec(tmp_path, keys), "output": {"uri": str(tmp_path / "out")}})
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "diagnostics.json", "merge.json", "model.safetensors"]
    rows = {r["key"]: r for r in res.manifest["tensors"]}
    assert all(r["group"] == "mlp_up" for r in rows.values())
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    norms = [out[k].norm() for k in keys]
    assert all(torch.isfinite(n) for n in norms)
    # One worker per core, as for every method, with freed work arrays given back at once
    # (merging/heap.py), which is what keeps two workers' float64 arrays in the memory target.
    assert all(name.startswith("merge") for name in threads) if default_workers() > 1 else threads == {"MainThread"}
    assert unmapping == {True} and not heap.active()


def test_manifest_redacts_credentials_in_uris():
    from merging.io.sources import redact_uri
    assert redact_uri("https://user:pw@host.example/m/model.safetensors?X-Amz-Signature=abc#x") == "https://host.example/m/model.safetensors"
    assert redact_uri("s3://bucket/key?versionId=1") == "s3://bucket/key"
    assert redact_uri("/local/path?odd") == "/local/path?odd"  # local paths are names, not URLs


def test_side_files_beside_a_standard_weight_file(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text('{"model_type": "bert"}')
    for t in range(2):
        save_file({"w": torch.randn(4, 4)}, str(tmp_path / f"e{t}.safetensors"))
    merging.merge({"method": "weight_average", "base": {"uri": str(tmp_path / "base" / "model.safetensors")},
                   "experts": [{"uri": str(tmp_path / f"e{t}.safetensors")} for t in range(2)],
                   "output": {"uri": str(tmp_path / "out")}})
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "bert"}'


def test_values_that_overflow_the_compute_dtype_are_named(tmp_path):
    big = torch.full((4, 4), 1e300, dtype=torch.float64)
    save_file({"w": big}, str(tmp_path / "base.safetensors"))
    for t in range(2):
        save_file({"w": big.clone()}, str(tmp_path / f"e{t}.safetensors"))
    spec = {"method": "weight_average", "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": str(tmp_path / f"e{t}.safetensors")} for t in range(2)], "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(merging.MergeError, match=r"tensor 'w' overflows float32.*compute_dtype"):
        merging.merge(spec)
    spec["options"] = {"compute_dtype": "float64"}
    merging.merge(spec)
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], big)


def test_diagnostics_sampled_full_and_off(ckpts):
    root, base = ckpts
    res = merging.merge(_spec(root))
    diag = json.loads((root / "out" / "diagnostics.json").read_text())
    assert res.diagnostics["format"] == diag["format"] == "submerge.diagnostics/1"
    assert diag["sampling"]["sampled"] is True and 0 < len(diag["sampling"]["svd_layers"]) <= 6
    assert {row["key"] for row in diag["layers"]} == {k for k in base if k != "enc.position_ids"}
    assert diag["errors"] == []
    assert json.loads((root / "out" / "merge.json").read_text())["files"]["diagnostics.json"]["sha256"]
    full = merging.merge(_spec(root, output={"uri": str(root / "full")}, options={"diagnostics": "full"})).diagnostics
    assert len(full["sampling"]["svd_layers"]) == 7  # every matrix key: 6 fc1 + head
    merging.merge(_spec(root, output={"uri": str(root / "off")}, options={"diagnostics": "off"}))
    assert not (root / "off" / "diagnostics.json").exists()


def test_integer_buffers_are_copied_with_role_other(tmp_path):
    """A 2-D int64 buffer (BERT's position_ids is (1, 512)) is no matrix: copied, role 'other'."""
    base = {"emb.position_ids": torch.arange(12, dtype=torch.int64).reshape(1, 12), "fc.weight": torch.randn(4, 3)}
    save_file(base, str(tmp_path / "b.safetensors"))
    for t in range(2):
        save_file({**base, "fc.weight": base["fc.weight"] + t + 1}, str(tmp_path / f"e{t}.safetensors"))
    res = merging.merge({"method": "tsv_m", "base": {"uri": str(tmp_path / "b.safetensors")},
                         "experts": [{"uri": str(tmp_path / f"e{t}.safetensors")} for t in range(2)],
                         "output": {"uri": str(tmp_path / "out")}, "options": {"diagnostics": "off"}})
    row = next(r for r in res.manifest["tensors"] if r["key"] == "emb.position_ids")
    assert (row["action"], row["role"], row["role_source"]) == ("copied", "other", "non-floating buffer")
    assert next(r for r in res.manifest["tensors"] if r["key"] == "fc.weight")["role"] == "matrix"


def _matrix_ckpts(root, keys, n_experts=2):
    torch.manual_seed(1)
    base = {k: torch.randn(*shape) for k, shape in keys.items()}
    save_file(base, str(root / "base.safetensors"))
    for t in range(n_experts):
        save_file({k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}, str(root / f"e{t}.safetensors"))
    return {"method": "tsv_m", "params": {"alpha": 1.0}, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors")} for t in range(n_experts)],
            "options": {"diagnostics": "off"}}


def _first_matrix_waits_for_call(monkeypatch, n: int) -> list[str]:
    """Make TSV-M's first matrix merge block until the n-th one has started (failing after 20 s);
    returns the merging threads' names, one per call."""
    import threading

    from merging.methods import tsv_m
    started = threading.Event()
    calls: list[str] = []
    original = tsv_m.tsv_merge_matrix

    def merge_matrix(taus):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            assert started.wait(20), f"matrix {n} never started while the first ran"
        elif len(calls) == n:
            started.set()
        return original(taus)
    monkeypatch.setattr(tsv_m, "tsv_merge_matrix", merge_matrix)
    return calls


def test_a_small_tensor_queued_behind_a_large_one_does_not_idle_a_worker(tmp_path, monkeypatch):
    """With 2 workers, the second large matrix must start while the first is still running even
    though a bias sits between them in plan order (a count-based window of 2 jobs waited on the
    first matrix with the bias as the only other job, so the merge below would deadlock)."""
    spec = _matrix_ckpts(tmp_path, {"a.weight": (48, 32), "b.bias": (48,), "c.weight": (48, 32)})
    calls = _first_matrix_waits_for_call(monkeypatch, 2)
    # The CPU engine's pool: on CUDA the engine runs one worker (one stream of kernels).
    merging.merge({**spec, "output": {"uri": str(tmp_path / "out")}, "options": {"diagnostics": "off", "workers": 2, "device": "cpu"}})
    assert len(calls) == 2 and len(set(calls)) == 2, calls


def test_a_job_that_finishes_early_frees_its_place_while_a_longer_one_runs(tmp_path, monkeypatch):
    """Three equal matrices, 2 workers (a window of two): the third must start as soon as the
    second finishes, while the first is still running. Storing results in plan order kept the
    finished second job in the window until the first was done, and this merge would time out."""
    spec = _matrix_ckpts(tmp_path, {f"m{i}.weight": (48, 32) for i in range(3)} | {"m0.bias": (48,)})
    calls = _first_matrix_waits_for_call(monkeypatch, 3)
    res = merging.merge({**spec, "output": {"uri": str(tmp_path / "out")}, "options": {"diagnostics": "off", "workers": 2, "device": "cpu"}})
    assert len(calls) == 3
    # The manifest lists the tensors in plan order whatever order they finished in.
    assert [r["key"] for r in res.manifest["tensors"]] == ["m0.bias", "m0.weight", "m1.weight", "m2.weight"]


def test_workers_do_not_change_the_result(tmp_path):
    spec = _matrix_ckpts(tmp_path, {f"l{i}.weight": (40, 24) for i in range(5)} | {f"l{i}.bias": (40,) for i in range(5)}, 3)
    outs = []
    for w in (1, 3, None):
        out = tmp_path / f"out{w}"
        merging.merge({**spec, "output": {"uri": str(out)}, "options": {"diagnostics": "off", "workers": w}})
        outs.append(load_file(str(out / "model.safetensors")))
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        assert all(torch.equal(other[k], outs[0][k]) for k in outs[0])


def test_esm_layers_finishing_out_of_order_give_the_one_worker_result(tmp_path, monkeypatch):
    """ESM's inter-layer scaling averages the norms of a group's layers: with the first layer
    held back so it finishes last, several workers must still give the bytes one worker gives."""
    import time

    from merging.methods.esm import Esm
    original = Esm._esd_merge

    def esd_merge(self, job):
        if job.key.startswith("blocks.0.") and job.key.endswith("c_fc.weight"):
            time.sleep(0.3)
        return original(self, job)
    monkeypatch.setattr(Esm, "_esd_merge", esd_merge)
    orders = []
    original_factors = Esm.group_factors

    def group_factors(self, norms):
        orders.append([list(group) for group in norms.values()])
        return original_factors(self, norms)
    monkeypatch.setattr(Esm, "group_factors", group_factors)
    torch.manual_seed(1)
    keys = {f"blocks.{i}.mlp.c_fc.weight": (16, 4) for i in range(6)} | {f"blocks.{i}.mlp.c_fc.bias": (16,) for i in range(6)}
    spec = _esm_spec(tmp_path, keys, scale=lambda k: 1 + k.count("3"))
    outs, manifests = [], []
    for w in (1, 3):
        res = merging.merge({**spec, "output": {"uri": str(tmp_path / f"out{w}")}, "options": {"diagnostics": "off", "workers": w, "device": "cpu"}})
        outs.append(load_file(str(tmp_path / f"out{w}" / "model.safetensors")))
        manifests.append([(r["key"], r.get("group")) for r in res.manifest["tensors"]])
    assert manifests[0] == manifests[1]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in keys)
    # The group means are summed in plan order (a float sum's rounding depends on the order).
    assert orders == [[[f"blocks.{i}.mlp.c_fc.weight" for i in range(6)]]] * 2


def test_esm_never_runs_two_of_its_widest_polar_factors_at_once(tmp_path, monkeypatch):
    """The eigenbasis polar of ESM's widest layers is its memory peak: with 3 workers and two
    wide layers, their polars must not overlap, while a narrower layer's may overlap one."""
    import threading
    import time

    from merging.methods import esm
    original = esm.polar_times
    lock = threading.Lock()
    running: list[int] = []
    overlaps: list[tuple[int, ...]] = []

    def polar_times(u, y, exact=None):
        with lock:
            running.append(u.shape[0])
            overlaps.append(tuple(sorted(running)))
        time.sleep(0.4)
        with lock:
            running.remove(u.shape[0])
        return original(u, y, exact)
    monkeypatch.setattr(esm, "polar_times", polar_times)
    torch.manual_seed(2)
    keys = {"blocks.0.mlp.c_fc.weight": (16, 4), "blocks.1.mlp.c_fc.weight": (16, 4), "blocks.0.attn.in_proj_weight": (12, 4)}
    merging.merge({**_esm_spec(tmp_path, keys), "output": {"uri": str(tmp_path / "out")}, "options": {"diagnostics": "off", "workers": 3, "device": "cpu"}})
    assert all(state.count(16) <= 1 for state in overlaps), overlaps
    assert (12, 16) in overlaps, overlaps  # the narrower layer's polar ran beside a wide one


def test_the_memory_plan_cuts_what_does_not_fit_and_reads_ahead_as_before_what_does(monkeypatch):
    from merging import memory
    from merging.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams
    from merging.methods.tsv_m import TSVM
    from merging.methods.base import MergeContext
    from merging.plan import PlanItem
    from merging.roles import infer_role
    monkeypatch.setattr(memory, "memory_bytes", lambda: 24 << 30)
    assert memory.effective_budget(None, None) == 12 << 30  # half the machine's (or cgroup's) memory
    assert memory.effective_budget(8 << 30, 4 << 30) == 4 << 30  # the worker's budget caps the spec's
    assert memory.effective_budget(2 << 30, 4 << 30) == 2 << 30
    monkeypatch.setattr(memory, "memory_bytes", lambda: None)
    assert memory.effective_budget(None, None) == 8 << 30  # unknown memory

    def item(key, shape, dtype=torch.bfloat16):
        return PlanItem(key, infer_role(key, shape), shape, dtype, dtype, "merge")
    ctx = MergeContext([f"e{t}" for t in range(8)], torch.device("cpu"), torch.float32)
    ta = TaskArithmetic(TaskArithmeticParams(), ctx)
    # a Llama-3-8B-shaped vocabulary table and one MLP matrix, 8 experts, a 4 GiB budget, 2 workers
    plan = [item("model.embed_tokens.weight", (128256, 4096)), item("model.layers.0.mlp.up_proj.weight", (14336, 4096))]
    mp = memory.plan_memory(plan, 8, torch.float32, ta, 4 << 30, 2)
    assert set(mp.blocks) == {0, 1} and all(p <= 2 << 30 for p in mp.peaks.values())  # one worker's share each
    assert mp.blocks[0][0].start == 0 and mp.blocks[0][-1].stop == 128256
    assert all(a.stop == b.start for a, b in zip(mp.blocks[0], mp.blocks[0][1:]))
    assert mp.estimated_peak <= memory.RUNTIME_BYTES + (4 << 30)
    # TSV-M needs the MLP matrix whole: 58.7M entries x (4 B x (8 x 4 + 4) + 2 B) = 8.6 GB
    with pytest.raises(MemoryBudgetError, match=r"'model.layers.0.mlp.up_proj.weight' .* more than the memory budget of 4.0 GiB"):
        memory.plan_memory(plan, 8, torch.float32, TSVM(TSVM.Params(), ctx), 4 << 30, 2)
    mp = memory.plan_memory(plan, 8, torch.float32, TSVM(TSVM.Params(), ctx), 12 << 30, 2)
    assert set(mp.blocks) == {0}  # the mean-merged table in blocks, the matrix whole (alone in the window)
    # ViT-B/16-sized jobs fit: nothing is cut, and reading ahead stops at workers x the largest job, as before
    vit = [item(f"blocks.{i}.mlp.c_fc.weight", (3072, 768), torch.float32) for i in range(12)]
    mp = memory.plan_memory(vit, 8, torch.float32, ta, 12 << 30, 2)
    assert not mp.blocks and mp.window == 2 * max(mp.peaks.values())


@pytest.mark.parametrize("method", ["tsv_m", "ties"])  # ties: its prepasses load every tensor too
def test_recycled_task_buffers_do_not_change_the_result(tmp_path, monkeypatch, method):
    """Large jobs' task-vector buffers are reused once their result is stored. With the threshold
    lowered so that every matrix here is recycled, any buffer handed out while a worker still
    read it would change the output; and the buffers must be few and actually reused. (TIES merges
    in tiles, without these buffers, except the matrices that diagnostics 'full' analyse whole.)"""
    from merging import stream
    shapes = {f"l{i}.weight": ((40, 24) if i % 2 else (24, 40)) for i in range(6)} | {f"l{i}.bias": (40,) for i in range(6)}
    spec = _matrix_ckpts(tmp_path, shapes, 3)
    diagnostics = "full" if method == "ties" else "off"
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(stream.TaskVectorLoader, "RECYCLE_BYTES", 1 << 62)
    merging.merge({**spec, "method": method, "output": {"uri": str(fresh)}, "options": {"diagnostics": diagnostics, "workers": 3, "device": "cpu"}})
    want = load_file(str(fresh / "model.safetensors"))

    monkeypatch.setattr(stream.TaskVectorLoader, "RECYCLE_BYTES", 1000)  # 3 × 40 × 24 × 4 B recycled, biases not
    handed_out = []
    original = stream.TaskVectorLoader._task_buffer

    def spy(self, shape):
        taus, raw = original(self, shape)
        if raw is not None:
            handed_out.append(raw.data_ptr())
        return taus, raw
    monkeypatch.setattr(stream.TaskVectorLoader, "_task_buffer", spy)
    for workers in (1, 3):
        handed_out.clear()
        out = tmp_path / f"recycled{workers}"
        merging.merge({**spec, "method": method, "output": {"uri": str(out)},
                       "options": {"diagnostics": diagnostics, "workers": workers, "device": "cpu"}})  # recycling is CPU-only
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert len(handed_out) >= 6 and len(set(handed_out)) <= workers + 1, (workers, handed_out)


def test_only_jobs_of_at_least_half_the_largest_size_take_recycled_buffers():
    """A window full of small jobs must not hold one largest-size buffer each (peak memory)."""
    from merging import stream
    loader = stream.TaskVectorLoader(None, [None, None], torch.device("cpu"), torch.float32, False, largest_job=8 << 20)
    shapes = {(2, 1024, 1024): True, (2, 512, 1024): True, (2, 500, 1024): False, (2, 4, 4): False}
    for shape, recycled in shapes.items():
        taus, raw = loader._task_buffer(shape)
        assert (raw is not None) == recycled and tuple(taus.shape) == shape
    assert stream.TaskVectorLoader(None, [None], torch.device("cpu"), torch.float32, False, 1 << 20)._buffer_bytes == 0  # small model
