"""Exploding gradients in an LSTM, with and without clipping.

The adding problem (Hochreiter & Schmidhuber, 1997), generated here: each input is a sequence of (value, marker)
pairs, values uniform in [0, 1], exactly two markers set to 1; the target is the sum of the two marked values. An
LSTM reads the sequence and a linear layer predicts the sum from its last hidden state (mean squared error).

The same model, data and seed are trained with plain SGD at a learning rate high enough that gradients explode:

    none         no clipping
    torch-norm   torch.nn.utils.clip_grad_norm_(params, max_norm)
    ours-norm    gradclip_cuda.clip_grad_norm_(params, max_norm)
    torch-value  torch.nn.utils.clip_grad_value_(params, clip_value)
    ours-value   gradclip_cuda.clip_grad_value_(params, clip_value)

It prints a table (final loss, steps with a non-finite loss, largest gradient norm, median time per step and per
clip call) and writes a plot of loss and gradient norm (before clipping) per step.

    python examples/lstm_exploding.py            # default: 200 steps, under 2 minutes on 2 CPU cores
    python examples/lstm_exploding.py --long     # 2000 steps
    python examples/lstm_exploding.py --steps 50 --no-plot
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

try:
    import gradclip_cuda as gc
except ImportError:  # run from a checkout that is built in place but not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gradclip_cuda as gc

RUNS = ("none", "torch-norm", "ours-norm", "torch-value", "ours-value")


def adding_batch(gen: torch.Generator, batch: int, length: int):
    """(inputs [batch, length, 2], targets [batch]): values uniform in [0, 1], one marker in each half."""
    values = torch.rand(batch, length, generator=gen)
    first = torch.randint(0, length // 2, (batch,), generator=gen)
    second = torch.randint(length // 2, length, (batch,), generator=gen)
    markers = torch.zeros(batch, length)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1)


class Model(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = torch.nn.LSTM(2, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


def clipper(run: str, max_norm: float, clip_value: float):
    """The clipping call of a run: returns the gradient norm before clipping when it computes one, else None."""
    if run == "none":
        return lambda params: None
    if run == "torch-norm":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm)
    if run == "ours-norm":
        return lambda params: gc.clip_grad_norm_(params, max_norm)
    if run == "torch-value":
        return lambda params: torch.nn.utils.clip_grad_value_(params, clip_value)
    if run == "ours-value":
        return lambda params: gc.clip_grad_value_(params, clip_value)
    raise ValueError(f"unknown run {run!r}")


def train(run: str, *, steps: int, seed: int, batch: int, length: int, hidden: int, lr: float, max_norm: float,
          clip_value: float) -> dict:
    """Trains one model from `seed` on the batches of `seed`; returns per-step losses, gradient norms (before
    clipping, all runs measured with torch.nn.utils.get_total_norm outside the timed step) and times."""
    torch.manual_seed(seed)
    model = Model(hidden)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    clip = clipper(run, max_norm, clip_value)
    gen = torch.Generator().manual_seed(seed + 1)
    losses, norms, step_s, clip_s = [], [], [], []
    for _ in range(steps):
        x, y = adding_batch(gen, batch, length)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        # The norm for the plot, outside the timed region and the same function for every run.
        t1 = time.perf_counter()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        t2 = time.perf_counter()
        clip(params)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        losses.append(loss.item())
        norms.append(norm)
        step_s.append((t1 - t0) + (t4 - t2))
        clip_s.append(t3 - t2)
    return {"loss": losses, "grad_norm": norms, "step_s": step_s, "clip_s": clip_s}


def summarize(results: dict, max_norm: float) -> list[dict]:
    rows = []
    for run, r in results.items():
        tail = r["loss"][-max(1, len(r["loss"]) // 10):]
        finite_norms = [n for n in r["grad_norm"] if math.isfinite(n)]
        rows.append({
            "run": run,
            "final_loss": statistics.fmean(tail),
            "nonfinite_steps": sum(not math.isfinite(v) for v in r["loss"]),
            "max_grad_norm": max(finite_norms) if finite_norms else math.nan,
            "steps_above_max_norm": sum(not (n <= max_norm) for n in r["grad_norm"]),
            "step_ms": 1e3 * statistics.median(r["step_s"]),
            "clip_ms": 1e3 * statistics.median(r["clip_s"]),
        })
    return rows


def table(rows: list[dict], max_norm: float) -> str:
    lines = [f"| run | final loss (mean of last 10% of steps) | steps with non-finite loss | largest finite grad norm "
             f"| steps with grad norm > {max_norm:g} | median step ms | median clip ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['final_loss']:.4g} | {r['nonfinite_steps']} | {r['max_grad_norm']:.3g} "
                     f"| {r['steps_above_max_norm']} | {r['step_ms']:.2f} | {r['clip_ms']:.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    styles = {"none": ("tab:red", "-"), "torch-norm": ("tab:blue", "-"), "ours-norm": ("tab:orange", "--"),
              "torch-value": ("tab:green", "-"), "ours-value": ("tab:purple", "--")}
    for run, r in results.items():
        color, ls = styles[run]
        steps = range(1, len(r["loss"]) + 1)
        ax_loss.plot(steps, r["loss"], color=color, ls=ls, lw=1, label=run)
        ax_norm.plot(steps, r["grad_norm"], color=color, ls=ls, lw=1, label=run)
        bad = next((i for i, v in enumerate(r["loss"], 1) if not math.isfinite(v)), None)
        if bad is not None:  # the line ends there: mark where
            for ax in (ax_loss, ax_norm):
                ax.axvline(bad, color=color, ls=":", lw=1)
            ax_loss.annotate(f"{run}: loss non-finite from step {bad}", (bad, 1), xytext=(6, 0),
                             textcoords="offset points", color=color, fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (MSE, log)")
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("gradient norm before clipping (log)")
    ax_norm.set_xlabel("step")
    ax_loss.set_title(title)
    ax_loss.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default 200, or 2000 with --long")
    ap.add_argument("--long", action="store_true", help="2000 steps (unless --steps is given)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=50, help="sequence length")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--clip-value", type=float, default=0.1)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_exploding.png"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 2000 if args.long else 200
    return args


def main(argv=None) -> dict:
    """Runs the comparison; returns {"args", "results" (per run), "rows" (the table)}."""
    args = parse(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    results = {}
    for run in runs:
        results[run] = train(run, steps=args.steps, seed=args.seed, batch=args.batch, length=args.length,
                             hidden=args.hidden, lr=args.lr, max_norm=args.max_norm, clip_value=args.clip_value)
    rows = summarize(results, args.max_norm)
    print(f"LSTM adding problem: length {args.length}, hidden {args.hidden}, batch {args.batch}, SGD lr {args.lr}, "
          f"{args.steps} steps, seed {args.seed}, max_norm {args.max_norm}, clip_value {args.clip_value}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows, args.max_norm))
    if not args.no_plot:
        plot(results, args.out, f"LSTM, adding problem (length {args.length}), SGD lr {args.lr}: "
                                f"max_norm {args.max_norm}, clip_value {args.clip_value}")
        print(f"plot: {args.out}")
    return {"args": args, "results": results, "rows": rows}


if __name__ == "__main__":
    main()
