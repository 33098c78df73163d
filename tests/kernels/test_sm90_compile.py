"""The policy decode kernels compile for an H100 (sm_90: PTX and cubin) on this CPU machine.

The interpreter runs kernels as Python and lets through what the compiler refuses (a loop-carried
variable changing shape, for one), so this compiles them for real. In a subprocess: under
TRITON_INTERPRET=1 (set for the whole test session) `triton.jit` gives interpreted functions.
"""
import os
import subprocess
import sys

COMPILE = r'''
import inspect
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvfx.kernels.quest import _quest_score_kernel, _quest_select_kernel
from kvfx.kernels.slot_attention import _slot_attention_kernel
from kvfx.kernels.slot_decode import _slot_decode_kernel

def build(fn, types, consts):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    cx = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    assert "cubin" in triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32)).asm

bf, f32, i32 = "*bf16", "*fp32", "*i32"
for codec, codes, bits, index, protect in (("int4", "*u8", 4, "none", "recent"), ("fp8", "*fp8e4nv", 8, "pages", "none"),
                                           ("int8", "*u8", 8, "slots", "sink")):
    build(_slot_attention_kernel, dict(q_ptr=bf, k_ptr=codes, v_ptr=codes, kp_ptr=bf, vp_ptr=bf, pos_ptr=i32, idx_ptr=i32,
                                       bias_ptr=f32, new_pos_ptr="*i64", m_ptr=f32, l_ptr=f32, acc_ptr=f32, logit_ptr=f32,
                                       qk_scale="fp32"),
          dict(GQ=4, D=128, BLOCK_M=16, BLOCK_N=64, CODEC=codec, BITS=bits, G=32, INDEX=index, PAGE=16,
               HAS_BIAS=protect == "sink", CAUSAL=True, LOGITS=protect == "recent", DOT=tl.bfloat16))
    build(_slot_decode_kernel, dict(m_ptr=f32, l_ptr=f32, acc_ptr=f32, logit_ptr=f32, q_ptr=bf, k_new_ptr=bf, v_new_ptr=bf,
                                    new_pos_ptr="*i64", bias_ptr=f32, k_codes=codes, k_params=bf, v_codes=codes,
                                    v_params=bf, slot_pos_ptr=i32, score_ptr=f32, page_min_ptr=bf, page_max_ptr=bf,
                                    out_ptr=bf, qk_scale="fp32"),
          dict(GQ=4, BLOCK_G=4, PART_M=16, D=128, BLOCK_C=2048, PROTECT=protect, SINK=4, SINK_BLOCK=4,
               SCORED=protect == "recent", CODEC=codec, BITS=bits, G=32, DTYPE=tl.bfloat16,
               PAGE=16 if protect == "none" else 0, BLOCK_P=16, HAS_BIAS=protect == "sink", CAUSAL=True))
build(_quest_score_kernel, dict(q_ptr=bf, min_ptr=bf, max_ptr=bf, slot_pos_ptr=i32, score_ptr=f32, newest_ptr=i32),
      dict(GQ=4, BLOCK_G=4, D=128, PAGE=16, PAGE_BLOCK=16, BLOCK_P=32))
build(_quest_select_kernel, dict(score_ptr=f32, newest_ptr=i32, pages_ptr=i32), dict(NP_BLOCK=4096, CHUNK=1024))
print("compiled")
'''


def test_policy_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
