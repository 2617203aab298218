"""evo_step on the GPU at LLaDA-8B shapes: time, bandwidth, and the plain torch.argmax floor.

    python3 benchmarks/gpu/kernels.py [--json FILE]

For V = 126464 (bf16 logits), rows R in {32, 288}, batch B in {1, 8, 32}: the
median time of one greedy evo_step per backend (cuda, triton), of torch.argmax
over the same logits (what a hard-mask decoder needs at least), and of the authors'
eager post-processing (B = 1 only: it is a batch-1 loop), by CUDA events
(triton.testing.do_bench). Inputs rotate among enough copies to exceed the L2
cache. Bandwidth counts the logits bytes once, against a measured device copy.
"""
import argparse
import json
import statistics

import torch
import triton.testing

from evofast import baselines
from evofast.ops import backends, evo_step

V, M, K, ALPHA = 126464, 126336, 3, 0.7
dev = torch.device("cuda")


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")  # ms


def graph_ms(call, bufs):
    """Milliseconds per call of `call(buf)` for each buffer, all captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for buf in bufs:            # warm-up outside the graph (allocations, autotuning)
            call(buf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for buf in bufs:
            call(buf)
    return bench(graph.replay) / len(bufs)


def copy_bandwidth():
    a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6  # GB/s, read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    peak = copy_bandwidth()
    rows = []
    print(f"device copy bandwidth {peak:.0f} GB/s; backends {backends()}")
    print(f"{'B':>3} {'R':>4} {'provider':>14} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'x argmax':>8}")
    for R in (32, 288):
        for B in (1, 8, 32):
            P = 128
            L = P + max(R, 32)
            nbytes = B * R * V * 2
            copies = max(1, min(16, (200 << 20) // nbytes + 1))
            bufs = [(torch.randn(B, R, V, device=dev) * 2).to(torch.bfloat16) for _ in range(copies)]
            x0 = torch.cat([torch.randint(0, M, (B, P), device=dev), torch.full((B, L - P), M, device=dev)], 1)
            x, conf = x0.clone(), torch.zeros(B, L, dtype=torch.float64, device=dev)
            n = 2                      # an int, as generate passes it (a device tensor costs a sync to check)
            it = [0]

            def nxt():
                it[0] = (it[0] + 1) % copies
                return bufs[it[0]]

            def reset():
                x.copy_(x0); conf.zero_()
            t_reset = bench(reset)
            res = {"argmax": bench(lambda: torch.argmax(nxt(), -1))}
            for be in ("cuda", "triton"):
                if be in backends():
                    res[be] = bench(lambda: (reset(), evo_step(nxt(), x, conf, n, row0=P, block_start=P,
                                                               block_end=P + 32, prompt_len=P, mask_id=M,
                                                               k_soft=K, alpha=ALPHA, backend=be))) - t_reset
            # device time alone: one CUDA graph replaying the op over every copy (no host work, no
            # NaN check), per call; the same for argmax
            for name, call in (("cuda-graph", lambda buf: evo_step(
                    buf, x, conf, n, row0=P, block_start=P, block_end=P + 32, prompt_len=P, mask_id=M,
                    k_soft=K, alpha=ALPHA, backend="cuda", check_finite=False)),
                               ("argmax-graph", lambda buf: torch.argmax(buf, -1))):
                if name == "cuda-graph" and "cuda" not in backends():
                    continue
                try:
                    res[name] = graph_ms(call, bufs)
                except Exception as e:  # noqa: BLE001 - a capture problem must not end the grid
                    print(f"  {name}: not captured ({type(e).__name__}: {str(e)[:120]})")
            if B == 1:
                full = torch.cat([torch.randn(1, P, V, device=dev).to(torch.bfloat16), bufs[0]], 1)
                colm = full[..., M].clone()

                def authors():
                    full[..., M] = colm
                    reset()
                    baselines.authors_step(full, x, conf, n, mask_id=M, k_soft=K, alpha=ALPHA,
                                           block_start=P, block_end=P + 32, prompt_len=P)
                res["authors-eager"] = bench(authors, reps=100) - t_reset
            for name, ms in res.items():
                gbs = nbytes / ms / 1e6
                rows.append(dict(B=B, R=R, provider=name, ms=ms, GBps=gbs, frac_copy=gbs / peak))
                base = res.get("argmax-graph" if name.endswith("-graph") else "argmax", res["argmax"])
                print(f"{B:>3} {R:>4} {name:>14} {ms:9.4f} {gbs:7.0f} {100 * gbs / peak:5.1f}% "
                      f"{ms / base:8.2f}")
            del bufs
    if args.json:
        import os
        import subprocess

        import triton

        def sh(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            except OSError:
                return None
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                       triton=triton.__version__,
                       driver=sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                       commit=sh(["git", "rev-parse", "--short", "HEAD"]),
                       EVOFAST_CUDA_VALUE_TABLE=os.environ.get("EVOFAST_CUDA_VALUE_TABLE", "0"),
                       copy_GBps=peak, rows=rows), open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
