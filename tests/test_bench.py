"""Smoke test of the benchmark harness: tiny sets, one repeat. No timing is asserted."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.__main__ as harness  # noqa: E402


def test_harness_runs_every_provider_and_writes_results(tmp_path):
    rows = harness.main(["--device", "cpu", "--sets", "mixed-fp32-bf16-fp16", "--scale", "0.01",
                         "--repeats", "2", "--compile", "--out", str(tmp_path)])
    assert {r["provider"] for r in rows} == set(harness.default_providers("cpu", False, True))
    assert {"torch-foreach", "torch-per-tensor", "torch-compile", "gradclip", "gradclip-pytorch"} <= \
        {r["provider"] for r in rows}
    assert "torch-compile" not in harness.default_providers("cpu", False)  # opt-in
    assert {r["regime"] for r in rows} == {"clipped", "unclipped"}
    for r in rows:
        assert "wrong" not in r, r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["speedup"] > 0
        assert 0 < r["min_ms"] <= r["median_ms"] and r["floor_ms"] > 0
        assert r["floor_share"] == pytest.approx(r["floor_ms"] / r["median_ms"])
    written = sorted(os.listdir(tmp_path))
    assert [os.path.splitext(w)[1] for w in written] == [".json", ".md", ".png"]
    assert "| mixed-fp32-bf16-fp16 |" in (tmp_path / written[1]).read_text()
    assert (tmp_path / written[2]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_time_is_bounded_and_reported(monkeypatch):
    import time
    monkeypatch.setitem(harness.PROVIDERS, "torch-compile", lambda ps, m: time.sleep(5))
    rows = harness.main(["--device", "cpu", "--sets", "2000-fp32", "--providers", "torch-compile", "--scale", "0.001",
                         "--repeats", "1", "--compile-timeout", "1", "--no-save"])
    compiled = [r for r in rows if r["provider"] == "torch-compile"]
    assert len(compiled) == 2 and all(r["skipped"] == "did not compile in 1 s" for r in compiled)  # tried once
    assert all("median_ms" in r for r in rows if r["provider"] == "torch-foreach")


def test_providers_that_cannot_run_here_are_reported_not_run():
    rows = harness.main(["--device", "cpu", "--sets", "2000-fp32", "--providers", "gradclip-cuda", "--scale", "0.001",
                         "--repeats", "1", "--no-save"])
    assert all("skipped" in r for r in rows if r["provider"] == "gradclip-cuda")


def test_a_provider_that_disagrees_with_torch_is_reported_not_timed(monkeypatch):
    monkeypatch.setitem(harness.PROVIDERS, "broken", lambda ps, m: torch.nn.utils.get_total_norm([p.grad for p in ps]))
    rows = harness.main(["--device", "cpu", "--sets", "5000x256-fp32", "--providers", "broken", "--scale", "0.1",
                         "--repeats", "1", "--no-save"])
    broken = [r for r in rows if r["provider"] == "broken"]
    assert len(broken) == 2
    clipped = next(r for r in broken if r["regime"] == "clipped")
    assert "wrong" in clipped and "median_ms" not in clipped


def test_kernel_throughput_command(capsys):
    import pytest
    from gradclip_cuda import _ops
    if _ops.C is None:
        pytest.skip("needs the compiled library")
    import bench.kernels
    bench.kernels.main(["--elems", "65536"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GB" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["float32", "bfloat16", "float16", "float64"]
    cells = [r.strip("| ").split(" | ")[1:] for r in rows[1:]]
    assert all(float(c) > 0 for r in cells for c in r[:-2])  # the norms
    assert all(c == "n/a" or float(c) > 0 for r in cells for c in r[-2:])  # scale and clamp, net of the restore


def test_noisy_rows_are_timed_again_flagged_and_kept_out_of_the_headline(monkeypatch):
    import time
    calls = []

    def erratic(ps, m):  # every other call 30 ms slower: an IQR far above half the median, whatever the retry
        calls.append(1)
        if len(calls) % 2:
            time.sleep(0.03)
        return gc_clip(ps, m)

    import gradclip_cuda as gc
    gc_clip = gc.clip_grad_norm_
    monkeypatch.setitem(harness.PROVIDERS, "gradclip", erratic)
    rows = harness.main(["--device", "cpu", "--sets", "5000x256-fp32", "--providers", "torch-foreach", "gradclip",
                         "--scale", "0.01", "--repeats", "4", "--no-save"])
    ours = [r for r in rows if r["provider"] == "gradclip"]
    assert all(r["noisy"] for r in ours)
    assert len(calls) == 2 * (2 * 5 + 1)  # per step: the check, then 5 timed calls twice (timed again once)
    assert harness.headline(rows) == [("5000x256-fp32", None, None)]
    assert "noisy or missing: re-run" in harness.markdown(harness._stamp("cpu"), rows)


def test_step_benchmark_runs_every_recipe_and_checks_they_train_alike():
    rows = harness.main(["--step", "--device", "cpu", "--sets", "gpt2-124m-fp32", "--scale", "0.002", "--repeats", "1",
                         "--no-save"])
    assert {r["recipe"] for r in rows} == {"torch", "ours-write", "ours-defer", "bare-step"}
    for r in rows:
        assert r["median_ms"] > 0 and r["vs_torch"] > 0
    passes = {r["recipe"]: r["passes"] for r in rows}
    assert passes["torch"] == 5 and passes["ours-write"] == 3 and passes["ours-defer"] == 1  # with a scaler


def test_distributed_benchmark_checks_times_and_writes_results(tmp_path):
    # 2 gloo ranks on this machine, tiny FSDP2 and TP sets, torch run on both, the floors added
    import json
    from bench import distributed
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    code = distributed.main(["--sizes", "20", "--tp-sizes", "8", "--torch-max", "20", "--repeats", "2",
                             "--torch-repeats", "1", "--floors", "--timeout", "240", "--out", str(tmp_path)])
    assert code == 0
    written = sorted(os.listdir(tmp_path))
    assert [os.path.splitext(w)[1] for w in written] == [".json", ".md"]
    rows = json.loads((tmp_path / written[0]).read_text())["rows"]
    floors = ["floor: list the .grad (C++)", "floor: one all_reduce", "floor: both"]
    assert [(r["set"], r["provider"]) for r in rows] == [(s, p) for s in ("fsdp-20", "tp-8")
                                                         for p in ["torch", "gradclip"] + floors]
    for r in rows:
        assert r["correct"] and 0 < r["min_s"] <= r["median_s"], r
        assert r["collectives"] == {"floor: list the .grad (C++)": 0}.get(r["provider"], 1), r
    assert "| fsdp-20 | 20 | gradclip |" in (tmp_path / written[1]).read_text()
