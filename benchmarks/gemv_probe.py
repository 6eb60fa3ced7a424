"""Decode-time linear layers: cuBLAS's ``F.linear`` at one token (M = 1) and 16 tokens per step, against a plain
Triton GEMV swept over tiles and split-K, at Llama-3-8B's projection shapes and their fused forms (q/k/v as one
6144 x 4096 matrix, gate/up as one 28672 x 4096).

Usage (CUDA machine): ``python benchmarks/gemv_probe.py``. Each time is a replayed CUDA graph over enough copies of
the weight (~400 MB) that none is served from L2; TB/s counts the weight bytes. What it showed on an H200
(BENCHMARKS.md, eleventh session): the Triton GEMV does not beat cuBLAS, and a small matrix alone is far from the
bandwidth (8 MB at 1.2 TB/s) where the fused one is near it, which is why `kvpack.fuse_projections` exists.
"""
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvpack.bench.kernels import graph_ms


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    chunk = K // SPLIT
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(split * chunk, split * chunk + chunk, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
            x = tl.load(x_ptr + rk)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        out = tl.sum(acc, axis=1)
        tl.store(y_ptr + split * N + rn, out)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(split * chunk, split * chunk + chunk, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=rm[:, None] < M, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + split * M * N + rm[:, None] * N + rn[None, :], acc, mask=rm[:, None] < M)


def triton_gemv(x, w, bn, bk, warps, stages, split):
    M, K = x.shape
    N = w.shape[0]
    bm = 1 if M == 1 else 16
    y = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    gemv_kernel[(N // bn, split)](x, w, y, M, N, K, bm, bn, bk, split, num_warps=warps, num_stages=stages)
    return (y[0] if split == 1 else y.sum(0)).to(x.dtype)


def main():
    torch.manual_seed(0)
    shapes = [(1024, 4096), (4096, 4096), (6144, 4096), (14336, 4096), (28672, 4096), (4096, 14336)]
    for M in (1, 16):
        for N, K in (shapes if M == 1 else shapes[1:4]):
            copies = max(2, int(400e6 // (N * K * 2)))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref = F.linear(x.float(), ws[0].float())
            nbytes = N * K * 2
            t = graph_ms(lambda: [F.linear(x, w) for w in ws]) * 1e-3 / copies
            print(f"M={M} N={N} K={K} cublas {t*1e6:7.2f} us  {nbytes/t/1e12:5.2f} TB/s", flush=True)
            best = None
            for bn, bk, warps, stages, split in itertools.product((4, 8, 16, 32), (256, 512), (4,), (3,), (1, 2, 4)):
                if M > 1 and bn < 16:
                    continue
                if bn * bk > 16384 or (K // split) % bk or N % bn:
                    continue
                try:
                    out = triton_gemv(x, ws[0], bn, bk, warps, stages, split)
                    err = (out.float() - ref).abs().max().item()
                    tt = graph_ms(lambda: [triton_gemv(x, w, bn, bk, warps, stages, split) for w in ws]) * 1e-3 / copies
                except Exception as e:  # noqa: BLE001
                    print("  fail", bn, bk, warps, stages, split, type(e).__name__, str(e)[:80])
                    continue
                if best is None or tt < best[0]:
                    best = (tt, bn, bk, warps, stages, split, err)
            tt, *cfg, err = best
            print(f"   triton best {tt*1e6:7.2f} us {nbytes/tt/1e12:5.2f} TB/s cfg(bn,bk,w,st,split)={cfg} err={err:.2e}",
                  flush=True)
            del ws


if __name__ == "__main__":
    main()
