"""The examples run, and show what they claim, at a few steps."""
import importlib.util
import math
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    example = load("lstm_exploding")
    out = tmp_path_factory.mktemp("lstm") / "plot.png"
    return example.main(["--steps", "8", "--out", str(out)]), out


def test_lstm_exploding_ours_follows_torch(lstm_run):
    run, _ = lstm_run
    r = run["results"]
    for ours, theirs in (("ours-norm", "torch-norm"), ("ours-value", "torch-value")):
        assert all(math.isfinite(v) for v in r[ours]["loss"])
        torch.testing.assert_close(torch.tensor(r[ours]["loss"]), torch.tensor(r[theirs]["loss"]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r[ours]["grad_norm"]), torch.tensor(r[theirs]["grad_norm"]), rtol=1e-4,
                                   atol=1e-6)


def test_lstm_exploding_explodes_without_clipping(lstm_run):
    run, out = lstm_run
    r, max_norm = run["results"], run["args"].max_norm
    # Without clipping the gradient norm grows far past the clip threshold (or the loss stops being finite);
    # with it, the runs stay finite.
    assert not max(r["none"]["grad_norm"]) <= 100 * max_norm
    assert max(r["ours-norm"]["grad_norm"]) < 100 * max_norm
    # The clipped runs really did clip: the first step's norm is above the threshold and they diverge from "none".
    assert r["ours-norm"]["grad_norm"][0] > max_norm
    assert r["ours-norm"]["loss"][2:] != r["none"]["loss"][2:]
    rows = {row["run"]: row for row in run["rows"]}
    assert rows["ours-norm"]["nonfinite_steps"] == 0
    assert out.stat().st_size > 0
