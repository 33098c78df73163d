"""The decode kernels compile for an H100 (sm_90: PTX and cubin) on this CPU machine: the policy
kernels (every codec; int4/int2 at head dims 64 and 128, group sizes 32 and 64; Quest's page bounds in
bf16 and fp8), the positional
and KIVI decode attention of `kvfx::attend` / `kvfx::kivi_attend` with a mask bias, the split
combine, the int8 write and the fp8 first-write scale.

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
from kvfx.kernels.slot_attention import STORE_LAUNCH, _slot_attention_kernel
from kvfx.kernels.slot_decode import _slot_finish_kernel, _slot_scan_kernel, _slot_select_kernel
from kvfx.kernels.decode_attention import _decode_attention_kernel, _decode_combine_kernel, _decode_int_kernel
from kvfx.kernels.int8 import _store_write_int8_kernel
from kvfx.kernels.kivi import _fp8_scale_kernel

def build(fn, types, consts, **options):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    cx = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    src = ASTSource(fn, sig, constexprs=cx)
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm

bf, f32, i32 = "*bf16", "*fp32", "*i32"
# int4/int2 params of a bf16 store reach the slot kernel as int32 words of (scale, zero) (PW=1)
for codec, codes, bits, d, g, index, protect in (("int4", "*u8", 4, 128, 32, "none", "recent"),
                                                 ("int2", "*u8", 2, 128, 32, "slots", "none"),
                                                 ("int4", "*u8", 4, 64, 64, "pages", "sink"),
                                                 ("int2", "*u8", 2, 64, 32, "none", "recent"),
                                                 ("fp8", "*fp8e4nv", 8, 128, 32, "pages", "none"),
                                                 ("int8", "*u8", 8, 128, 32, "slots", "sink")):
    pw = int(codec in ("int4", "int2"))
    bounds = "*fp8e4nv" if codec == "fp8" else bf  # Quest's page bounds (`page_bounds`), finish kernel
    launch = STORE_LAUNCH[codec]  # as slot_partials launches it over a store
    build(_slot_attention_kernel, dict(q_ptr=bf, k_ptr=codes, v_ptr=codes, kp_ptr=i32 if pw else bf, vp_ptr=i32 if pw else bf,
                                       pos_ptr=i32, idx_ptr=i32, bias_ptr=f32, new_pos_ptr="*i64", m_ptr=f32, l_ptr=f32,
                                       acc_ptr=f32, logit_ptr=f32, qk_scale="fp32"),
          dict(GQ=4, D=d, BLOCK_M=16, BLOCK_N=launch.block_n, CODEC=codec, BITS=bits, G=g, INDEX=index, PAGE=16,
               HAS_BIAS=protect == "sink", CAUSAL=True, LOGITS=protect == "recent", DOT=tl.bfloat16, PW=pw,
               SKIP_DEAD=launch.skip_dead, PDL=index == "pages"),
          num_warps=launch.num_warps, num_stages=launch.num_stages, launch_pdl=index == "pages")
    policy = dict(PROTECT=protect, SINK=4 if protect == "sink" else 0, SCORED=protect == "recent",
                  HAS_BIAS=protect == "sink", CAUSAL=True, PDL=True)  # a policy step's chained launch
    build(_slot_scan_kernel, dict(m_ptr=f32, l_ptr=f32, logit_ptr=f32, q_ptr=bf, k_new_ptr=bf, new_pos_ptr="*i64",
                                  bias_ptr=f32, slot_pos_ptr=i32, score_ptr=f32, stats_ptr=i32, low_ptr=f32, at_ptr=i32,
                                  qk_scale="fp32"),
          dict(GQ=4, BLOCK_G=4, PART_M=16, NS_P=32, D=d, BLOCK_S=512, **policy), launch_pdl=True)
    build(_slot_select_kernel, dict(new_pos_ptr="*i64", bias_ptr=f32, slot_pos_ptr=i32, score_ptr=f32, stats_ptr=i32,
                                    low_ptr=f32, at_ptr=i32),
          dict(NB_P=32, BLOCK_S=512, SINK_BLOCK=4, **policy), launch_pdl=True)
    build(_slot_finish_kernel, dict(m_ptr=f32, l_ptr=f32, acc_ptr=f32, q_ptr=bf, k_new_ptr=bf, v_new_ptr=bf,
                                    new_pos_ptr="*i64", bias_ptr=f32, k_codes=codes, k_params=bf, v_codes=codes,
                                    v_params=bf, slot_pos_ptr=i32, score_ptr=f32, page_min_ptr=bounds,
                                    page_max_ptr=bounds, stats_ptr=i32, low_ptr=f32, at_ptr=i32, out_ptr=bf,
                                    qk_scale="fp32"),
          dict(GQ=4, BLOCK_G=4, PART_M=16, NS_P=32, D=d, NB_P=32, SINK_BLOCK=4, CODEC=codec, BITS=bits, G=g,
               DTYPE=tl.bfloat16, PAGE=16 if protect == "none" else 0, BLOCK_P=16, BOUNDS_FP8=bounds != bf, **policy),
          launch_pdl=True)
# alone; with the step's scan; Quest's bounds in the model dtype or in fp8 (`page_bounds`)
for scan, has_bias, bounds in ((False, False, bf), (True, False, "*fp8e4nv"), (True, True, bf)):
    build(_quest_score_kernel, dict(q_ptr=bf, min_ptr=bounds, max_ptr=bounds, slot_pos_ptr=i32, page_score_ptr=f32,
                                    newest_ptr=i32, new_pos_ptr="*i64", bias_ptr=f32, score_ptr=f32, stats_ptr=i32,
                                    low_ptr=f32, at_ptr=i32),
          dict(GQ=4, BLOCK_G=4, D=128, PAGE=16, PAGE_BLOCK=16, BLOCK_P=64, SCAN=scan, HAS_BIAS=has_bias, CAUSAL=True,
               PDL=scan))
for tail in (0, 1):  # 4096 pages; 4097 as 4096 + a tail
    build(_quest_select_kernel, dict(score_ptr=f32, newest_ptr=i32, pages_ptr=i32),
          dict(MAIN=4096, TAIL=tail, POOL=3, PDL=True), launch_pdl=True)
for codec, codes in (("none", bf), ("int8", "*u8")):  # kvfx::attend's positional mode
    build(_slot_attention_kernel, dict(q_ptr=bf, k_ptr=codes, v_ptr=codes, kp_ptr=bf, vp_ptr=bf, pos_ptr=f32, idx_ptr=f32,
                                       bias_ptr=f32, new_pos_ptr=f32, m_ptr=f32, l_ptr=f32, acc_ptr=f32, logit_ptr=f32,
                                       qk_scale="fp32"),
          dict(GQ=4, D=128, BLOCK_M=16, BLOCK_N=64, CODEC=codec, BITS=8, G=1, INDEX="none", PAGE=1, HAS_BIAS=True,
               CAUSAL=False, LOGITS=False, DOT=tl.bfloat16, PW=0, POSITIONAL=True))
kivi = dict(q_ptr=bf, k_ring=bf, v_ring=bf, len_ptr=i32, bias_ptr=f32, m_ptr=f32, l_ptr=f32, acc_ptr=f32, qk_scale="fp32")
for bits, word, block_n in ((4, bf, 32), (2, "*i64", 128), (8, bf, 64)):  # 1, 4, 2 groups a step
    build(_decode_int_kernel, dict(kivi, k_codes="*u8", v_codes="*u8", k_scale=word, k_zero=word, v_scale=bf, v_zero=bf),
          dict(GQ=4, R=128, G=32, D=128, BITS=bits, DOT=tl.bfloat16, BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=32, VMODE=0,
               PW=int(bits == 2), HAS_BIAS=True, BLOCK_T=256))
build(_decode_attention_kernel, dict(kivi, k_codes="*fp8e4nv", v_codes="*fp8e4nv", k_scale=f32, k_zero=f32, v_scale=f32,
                                     v_zero=f32),
      dict(GQ=4, R=128, G=32, D=128, BITS=8, FP8=True, DOT=tl.bfloat16, BLOCK_M=16, BLOCK_N=64, BLOCK_R=32,
           HAS_BIAS=True, BLOCK_T=256))
build(_decode_combine_kernel, dict(m_ptr=f32, l_ptr=f32, acc_ptr=f32, out_ptr=bf), dict(GQ=4, ROWS=16, D=128, BLOCK_S=128))
build(_store_write_int8_kernel, dict(x_ptr=bf, pos_ptr="*i64", codes_ptr="*u8", qparams_ptr=bf), dict(D=128))
build(_fp8_scale_kernel, dict(new_ptr=bf, scale_ptr=f32, start_ptr=i32, len_ptr=i32), dict(D=128, BLOCK_T=32))
print("compiled")
'''


def test_decode_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
