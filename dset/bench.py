"""Micro-benchmarks, measured side by side in one process.

    python -m dset.bench moe [--json] [--tokens 400 2000 8400] [--repeats 30] [--warmup 5]
    python -m dset.bench train [PRESET ...] [key=value ...]    (dset/bench_train.py: what bounds a training step)
    python -m dset.bench loader [--num-images N] [--size 640]  (dset/bench_loader.py: the data pipeline per worker)

``moe``: latency of the sparse ``MoEFFN`` (d_model 256, 6 experts, top-3, expert hidden 1024, batch 1,
eval mode, ``torch.inference_mode``) against (a) the "run every expert and mask" MoE
(``dense_moe_forward``) and (b) a dense FFN with the same active compute
(``Linear(256, 3*1024) -> ReLU -> Linear(3*1024, 256)``). Each configuration is warmed up, then the
three implementations are timed interleaved (one call of each per round); the median per
implementation is reported in milliseconds (ratios are of medians), the minimum alongside it. Other
processes on the same cores inflate the many-small-op sparse path more than a three-op dense FFN, so
every result records ``other_cpu_share``, the share of the machine's CPU time that other
processes used while it was timed (0 = quiet; trust ratios only when it is near 0), and the 1-minute
load average. The thread count is left as torch sets it.

Subcommands are registered in ``_build_parser``; add new ones there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .bench_loader import add_command as add_loader_command
from .bench_train import add_command as add_train_command
from .cpu_share import OtherCpuShare


def _time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Warm up, then time one call of each function per round; (median, min) in ms per function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def bench_moe(
    tokens: list[int],
    repeats: int = 30,
    warmup: int = 5,
    d_model: int = 256,
    num_experts: int = 6,
    top_k: int = 3,
    hidden_dim: int = 1024,
    activation: str = "relu",
    router_skew: float = 0.0,
    seed: int = 0,
) -> list[dict]:
    """Returns one result dict per token count (see module docstring)."""
    from dset.models.moe import MoEFFN, dense_moe_forward

    torch.manual_seed(seed)
    device = torch.device("cpu")
    moe = MoEFFN(d_model, hidden_dim, num_experts, top_k, activation=activation).eval()
    # Router weights ~ N(0, 0.05), bias = router_skew * linspace(1, -1, E): skew 0 routes nearly
    # evenly (padded path); skew 0.5 gives usage ~0.24 ... 0.08 (per-expert loop path).
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.05)
        moe.router.bias.copy_(router_skew * torch.linspace(1.0, -1.0, num_experts))
    act = nn.ReLU() if activation == "relu" else nn.GELU()
    matched = nn.Sequential(
        nn.Linear(d_model, top_k * hidden_dim), act, nn.Linear(top_k * hidden_dim, d_model)
    ).eval()

    results = []
    for n in tokens:
        x = torch.randn(1, n, d_model, device=device)
        with torch.inference_mode():
            torch.testing.assert_close(moe(x), dense_moe_forward(moe, x), atol=1e-4, rtol=1e-4)
            usage = moe.usage.tolist()
            dispatch = moe.last_dispatch
            load = OtherCpuShare().start()
            med = _time_interleaved(
                {
                    "sparse": lambda x=x: moe(x),
                    "dense_all": lambda x=x: dense_moe_forward(moe, x),
                    "matched_ffn": lambda x=x: matched(x),
                },
                warmup,
                repeats,
            )
            other_cpu_share = load.stop()
        results.append(
            {
                "bench": "moe",
                "tokens": n,
                "batch": 1,
                "d_model": d_model,
                "num_experts": num_experts,
                "top_k": top_k,
                "expert_hidden_dim": hidden_dim,
                "sparse_ms": round(med["sparse"][0], 3),
                "dense_all_ms": round(med["dense_all"][0], 3),
                "matched_ffn_ms": round(med["matched_ffn"][0], 3),
                "sparse_vs_matched": round(med["sparse"][0] / med["matched_ffn"][0], 3),
                "sparse_vs_dense_all": round(med["sparse"][0] / med["dense_all"][0], 3),
                "sparse_min_ms": round(med["sparse"][1], 3),
                "dense_all_min_ms": round(med["dense_all"][1], 3),
                "matched_ffn_min_ms": round(med["matched_ffn"][1], 3),
                "expert_usage": [round(u, 3) for u in usage],
                "dispatch": dispatch,
                "router_skew": router_skew,
                "repeats": repeats,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                # other processes competing for the cores inflate the many-op sparse path the most
                "other_cpu_share": other_cpu_share,
                "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                "torch": torch.__version__,
            }
        )
    return results


def _cmd_moe(args: argparse.Namespace) -> int:
    results = bench_moe(
        args.tokens, repeats=args.repeats, warmup=args.warmup, activation=args.activation,
        router_skew=args.router_skew,
    )
    if args.json:
        for r in results:
            print(json.dumps(r), flush=True)
        return 0
    r0 = results[0]
    print(
        f"MoE FFN latency, median of {args.repeats} (ms), batch 1, d={r0['d_model']}, "
        f"E={r0['num_experts']}, top-{r0['top_k']}, hidden {r0['expert_hidden_dim']}, "
        f"{args.activation}, device {r0['device']}, {r0['threads']} threads, torch {r0['torch']}, "
        f"router skew {r0['router_skew']}; other_cpu = share of the machine's CPU used by other processes"
    )
    header = (f"{'tokens':>7} {'sparse':>9} {'dense_all':>10} {'matched':>9} {'sparse/matched':>15} "
              f"{'sparse/dense_all':>17} {'dispatch':>9} {'other_cpu':>10}")
    print(header)
    for r in results:
        print(
            f"{r['tokens']:>7} {r['sparse_ms']:>9.3f} {r['dense_all_ms']:>10.3f} {r['matched_ffn_ms']:>9.3f} "
            f"{r['sparse_vs_matched']:>15.3f} {r['sparse_vs_dense_all']:>17.3f} {r['dispatch']:>9} "
            f"{str(r['other_cpu_share']):>10}"
        )
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dset.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("moe", help="sparse MoE FFN vs run-every-expert MoE vs compute-matched dense FFN")
    m.add_argument("--json", action="store_true", help="one JSON object per token count")
    m.add_argument("--tokens", type=int, nargs="+", default=[400, 2000, 8400])
    m.add_argument("--repeats", type=int, default=30)
    m.add_argument("--warmup", type=int, default=5)
    m.add_argument("--activation", choices=("relu", "gelu"), default="relu")
    m.add_argument("--router-skew", type=float, default=0.0,
                   help="router bias skew * linspace(1, -1, E): 0 = even expert groups, 0.5 = uneven")
    m.set_defaults(func=_cmd_moe)
    add_train_command(sub)
    add_loader_command(sub)
    return p


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
