"""Smoke test of the benchmark harness: tiny sets, one repeat. No timing is asserted."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.__main__ as harness  # noqa: E402


def test_harness_runs_every_provider_and_writes_results(tmp_path):
    rows = harness.main(["--device", "cpu", "--sets", "resnet50-fp32", "mixed-fp32-bf16-fp16", "--scale", "0.01",
                         "--repeats", "2", "--out", str(tmp_path)])
    assert {r["provider"] for r in rows} == set(harness.PROVIDERS)
    assert {r["regime"] for r in rows} == {"clipped", "unclipped"}
    for r in rows:
        assert "wrong" not in r, r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["speedup"] > 0
    written = sorted(os.listdir(tmp_path))
    assert len(written) == 2 and written[0].endswith(".json") and written[1].endswith(".md")
    assert "| resnet50-fp32 | 161 |" in (tmp_path / written[1]).read_text()


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
    bench.kernels.main(["--elems", "4096"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GB" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["float32", "bfloat16", "float16", "float64"]
    assert all(float(c) > 0 for r in rows[1:] for c in r.strip("| ").split(" | ")[1:])
