"""Compile the decode-attention kernel for sm_90 on any machine (no GPU needed) and count its main loop's SASS.

Usage: ``python benchmarks/kernel_sass.py [kind_k=0] [bits_k=4] [kind_v=0] [bits_v=4] [block_n=32] [warps=4]
[unpack=1] [off64=0]`` (kind 0: turbo_mse, 1: int). Prints the registers per thread
(``cuobjdump -res-usage``) and the instruction mix of the longest loop (``nvdisasm``), both from the tools that
ship with Triton. Shapes: Llama-3-8B heads (8 KV heads, GQA 4, head_dim 128), block size 16.
"""

import collections
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvpack.kernels import decode_attention as da

POINTERS = {"q_ptr": "*fp16", "qw_ptr": "*fp16", "k_cache_ptr": "*i32", "v_cache_ptr": "*i32", "k_cb_ptr": "*fp16",
            "v_cb_ptr": "*fp16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "wk_ptr": "*fp16",
            "wv_ptr": "*fp16", "window_lens_ptr": "*i32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
            "part_acc_ptr": "*fp32"}  # fmt: skip


def compile_split_kernel(kind_k=0, bits_k=4, kind_v=0, bits_v=4, block_n=32, warps=4, unpack=1, off64=0):
    fn = da._split_kernel
    consts = {"HKV": 8, "GQA": 4, "GPAD": 16, "D": 128, "KIND_K": kind_k, "BITS_K": bits_k, "KIND_V": kind_v,
              "BITS_V": bits_v, "BLOCK_SIZE": 16, "BLOCK_N": block_n, "UNPACK": unpack,
              "OFF64": off64}  # fmt: skip
    sig = {p.name: POINTERS.get(p.name, "fp32" if p.name == "qk_scale" else "i32") for p in fn.params}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})


def loop_mixes(sass: str) -> list[collections.Counter]:
    """Opcode counts of each backward-branch loop of a ``nvdisasm -c`` listing, longest first."""
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:", line.strip())}
    mixes = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [x for x in lines[labels[m.group(1)] : i + 1] if re.match(r"\s+/\*[0-9a-f]{4}\*/", x)]
            ops = (re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", x).split()[0] for x in body)
            mixes.append(collections.Counter(ops))
    return sorted(mixes, key=lambda c: -sum(c.values()))


def main() -> int:
    kernel = compile_split_kernel(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = "/tmp/kvpack_split_kernel.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    run = {"capture_output": True, "text": True}
    usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", path], check=True, **run).stdout
    print(*[line.strip() for line in usage.splitlines() if "REG" in line])
    listing = subprocess.run([f"{tools}/nvdisasm", "-c", path], check=True, **run).stdout
    for mix in loop_mixes(listing):  # the packed loop and the 16-bit window loop
        print("loop:", sum(mix.values()), "instructions", mix.most_common(16))
    return 0


if __name__ == "__main__":
    sys.exit(main())
