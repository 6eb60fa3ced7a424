"""Run the packed decode-attention kernel a few times on one shape, for a profiler (``ncu``) to read.

Usage (CUDA machine, repository root): ``ncu --clock-control none -k regex:_split_kernel -c 1 --section
WarpStateStats python benchmarks/profile_decode.py int:4 [batch=8] [context=32768] [kernel=triton|cuda]
[key=value tuning...]`` (``kernel=cuda``: the NVRTC kernel, ``-k regex:kvpack_cuda_decode``); the spec may name a key
and a value codec, ``turbo_mse:4/int:4:rotation=hadamard``.
Inputs as ``kvpack bench attention`` builds them (Llama-3-8B heads, random codes, 16-token pages, 132-token
window). Prints the median time of the calls (``triton.testing.do_bench``).
"""

from __future__ import annotations

import sys

import torch
import triton.testing

from kvpack.bench import kernels as bench
from kvpack.kernels.decode_attention import paged_decode_attention
from kvpack.kernels.cuda_decode import paged_cuda_decode


def main() -> int:
    spec = sys.argv[1]
    opts = dict(a.split("=") for a in sys.argv[2:])
    batch, ctx = int(opts.pop("batch", 8)), int(opts.pop("context", 32768))
    launch = {"triton": paged_decode_attention, "cuda": paged_cuda_decode}[opts.pop("kernel", "triton")]
    tuning = {k: (float(v) if k == "waves" else int(v)) for k, v in opts.items()}
    hq, hkv, d, bs, window = 32, 8, 128, 16, 132
    key_spec, _, value_spec = spec.partition("/")
    kf, vf = bench._fmt(key_spec, d), bench._fmt(value_spec or key_spec, d)
    g = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(batch, hq, d, device="cuda", dtype=torch.float16, generator=g)
    tables, lens, wk, wv, wl = bench.paged_decode_inputs(batch, ctx - window, window, hkv, d, bs, g)
    kc = bench.random_paged_cache(tables.numel(), bs, hkv, kf)
    vc = bench.random_paged_cache(tables.numel(), bs, hkv, vf)

    def step():
        return launch(query, kc, vc, tables, lens, wk, wv, wl, kf, vf, d**-0.5, **tuning)

    ms = triton.testing.do_bench(step, warmup=5, rep=20, return_mode="median")
    print(f"{spec} batch {batch} context {ctx} {tuning}: {ms * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
