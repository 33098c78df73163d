"""Static instruction counts of the KIVI int decode kernel for an H100, on a machine without a GPU.

Compiles `_decode_int_kernel` for sm_90 with Triton (pointer arguments marked 16-byte divisible, as
the JIT marks them at run time; without that every code byte becomes its own load and the counts mean
nothing), disassembles the cubin with the cuobjdump that ships with Triton, and counts the SASS of
the whole kernel and of its main loop (the longest backward branch: one step of BLOCK_N tokens) by
opcode. PRMT is split by selector: 0x4140 / 0x4342 spread code bytes into 16-bit halves, 0x5410 /
0x7632 pack two 16-bit params into one register, 0x3340 joins bytes. Counts are per warp and per
loop step; divide by the tokens a step for instructions a token. These counts are what the kernel
sections of docs/ARCHITECTURE.md quote; they change with the Triton version (the GPU machine runs
3.6, this one may not).

example: python benchmarks/sass_count.py
         python benchmarks/sass_count.py --bits 4 --warps 2 --block-n 64 --vmode 1 --out /tmp/r
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common import RESULTS, environment, write_json
from kvfx.kernels.decode_attention import _decode_int_kernel

DTYPES = {"bf16": (tl.bfloat16, "*bf16"), "fp16": (tl.float16, "*fp16")}
PRMT_KINDS = {"0x4140": "spread", "0x4342": "spread", "0x5410": "pack", "0x7632": "pack", "0x3340": "join"}
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/.*\bBRA\s+0x([0-9a-f]+)")


def compile_int_kernel(bits: int, dtype: str, warps: int, block_n: int, vmode: int, gq: int = 4):
    """`_decode_int_kernel` as the int4 / int2 / int8 path launches it for a store of `dtype` (int2's key
    params as words of four), head dim 128, G 32, R 128, compiled for sm_90."""
    dot, ptr = DTYPES[dtype]
    word = "*i64" if bits == 2 else ptr
    types = dict(q_ptr=ptr, k_codes="*u8", v_codes="*u8", k_scale=word, k_zero=word, v_scale=ptr, v_zero=ptr,
                 k_ring=ptr, v_ring=ptr, len_ptr="*i32", bias_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32",
                 acc_ptr="*fp32", qk_scale="fp32")
    consts = dict(GQ=gq, R=128, G=32, D=128, BITS=bits, DOT=dot, BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=32,
                  VMODE=vmode, PW=int(bits == 2), HAS_BIAS=False, BLOCK_T=256)
    names = list(inspect.signature(_decode_int_kernel.fn).parameters)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if types.get(n, "").startswith("*")}
    return triton.compile(ASTSource(_decode_int_kernel, signature, constexprs, aligned),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def disassemble(kernel) -> str:
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = pathlib.Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def opcode(name: str, operands: str) -> str:
    """The counted kind: the opcode without modifiers, PRMT with what its selector does."""
    base = name.split(".")[0]
    if base == "PRMT":
        selector = next((s for s in re.findall(r"0x[0-9a-f]+", operands) if s in PRMT_KINDS), None)
        return f"PRMT {PRMT_KINDS[selector]}" if selector else "PRMT"
    return "IMAD.MOV" if name.startswith("IMAD.MOV") else base


def count(sass: str) -> dict:
    """Instructions of the whole kernel and of its longest loop, by kind."""
    instructions = [(int(m.group(1), 16), opcode(m.group(2), m.group(3))) for m in INSTRUCTION.finditer(sass)]
    loops = [(int(target, 16), int(at, 16)) for at, target in BRANCH.findall(sass) if int(target, 16) < int(at, 16)]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0]) if loops else (0, -1)
    body = collections.Counter(kind for address, kind in instructions if start <= address <= end)
    return {"total": len(instructions), "loop": sum(body.values()), "loop_by_kind": dict(body.most_common())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example:" + __doc__.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", choices=(8, 4, 2), default=[4, 2])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the store's (and the dot's) dtype")
    parser.add_argument("--warps", type=int, default=1)
    parser.add_argument("--block-n", type=int, default=32, help="tokens a loop step (a multiple of G = 32)")
    parser.add_argument("--vmode", type=int, choices=(0, 1, 2), default=2, help="value-param expansion")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for sass_count.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sass_count: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    rows = []
    for bits in args.bits:
        counts = count(disassemble(compile_int_kernel(bits, args.dtype, args.warps, args.block_n, args.vmode)))
        rows.append(dict(kernel="_decode_int_kernel", bits=bits, dtype=args.dtype, warps=args.warps,
                         block_n=args.block_n, vmode=args.vmode, **counts,
                         loop_per_token=counts["loop"] / args.block_n))
        top = ", ".join(f"{k} {n}" for k, n in list(counts["loop_by_kind"].items())[:10])
        print(f"int{bits}: {counts['total']} instructions, loop {counts['loop']} "
              f"({counts['loop'] / args.block_n:.1f} a token): {top}")
    write_json(args.out / "sass_count.json", {"benchmark": "sass_count", "target": "sm_90 (static, compiled on CPU)",
                                              "environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
