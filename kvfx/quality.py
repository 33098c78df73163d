"""What a compressed KV cache costs in quality: passkey retrieval and perplexity, measured through the
kvfx compile path (and, as references, through the model's own forward or another cache).

    prompts = passkey_prompts(tokenizer, lengths=[1024, 2048], depths=[0.1, 0.5, 0.9])
    methods = [EAGER, kvfx_method(kv="int4"), kvfx_method(kv="int4", policy="snapkv", budget=0.2)]
    result = evaluate_passkey(model, tokenizer, prompts, methods)      # one row per (method, prompt)
    print(kvfx.quality_report.table(result.rows))

A method's kvfx options go to the backend unchanged (``torch.compile(model.forward, backend="kvfx",
options=...)``), so any option `kvfx.KVConfig` accepts can be measured; options it rejects make the
method *skipped*, with KVConfig's message as the reason, not a failure of the whole sweep.

Passkey retrieval (Mohtashami & Jaggi, 2023): filler text hides one sentence "The pass key is NNNNN.
Remember it." at a chosen depth; the raw prompt (no chat template) ends with the question, and the
answer is right when the generated digits contain the key. Perplexity: prefill a prefix of a text, then
feed the following tokens one at a time through the cache (teacher forcing), so every prediction reads
the compressed cache the way decoding does, not one long full-precision prefill.
"""
from __future__ import annotations

import random
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import StaticCache

import kvfx
from kvfx.config import KVConfig, KVConfigError
from kvfx.decode import CACHE_KWARG, decode_steps, teacher_forced_logits

# The prompt of Landmark Attention's passkey task, split into the pieces the generator assembles.
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8  # a 5-digit key is at most 6 tokens (a space, then one token per digit, in SmolLM2's vocabulary)

PASSKEY_LENGTHS = (1024, 2048, 4096, 7168)
PASSKEY_DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt as token ids (what every method is given, unchanged)."""

    ids: tuple[int, ...]
    key: str
    length: int          # the requested length in tokens; len(ids) is at most this and within one filler sentence
    depth: float         # the requested needle depth, a fraction of the prompt
    needle_start: int    # index of the needle's first token in ids

    def to_json(self) -> dict:
        return {**asdict(self), "ids": list(self.ids)}

    @classmethod
    def from_json(cls, d: Mapping) -> "PasskeyPrompt":
        return cls(**{**d, "ids": tuple(d["ids"])})


def passkey_prompt(tokenizer, length: int, depth: float, seed: int = 0) -> PasskeyPrompt:
    """A prompt of about `length` tokens with a random 5-digit key whose sentence starts at the filler
    sentence boundary nearest to `depth` * length.

    The pieces are tokenized separately and concatenated as ids (each starts with a space or newline, so
    this is how the joined text tokenizes too), which makes the length exact to count: it falls short of
    `length` by less than one filler sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be a fraction in [0, 1], got {depth!r}")
    key = str(random.Random(f"passkey-{length}-{depth}-{seed}").randint(10000, 99999))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, needle, question = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION)
    sentences = [encode(" " + s) for s in FILLER]
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey prompt length {length} is shorter than its fixed text "
                         f"({length - room} tokens)")
    filler: list[list[int]] = []
    while sum(map(len, filler)) + len(sentences[len(filler) % len(sentences)]) <= room:
        filler.append(sentences[len(filler) % len(sentences)])
    boundaries = [0]
    for sentence in filler:
        boundaries.append(boundaries[-1] + len(sentence))
    split = min(range(len(boundaries)), key=lambda i: abs(len(intro) + boundaries[i] - depth * length))
    ids = intro + [t for s in filler[:split] for t in s] + needle + [t for s in filler[split:] for t in s] + question
    return PasskeyPrompt(tuple(ids), key, length, depth, len(intro) + boundaries[split])


def passkey_prompts(tokenizer, lengths: Sequence[int] = PASSKEY_LENGTHS, depths: Sequence[float] = PASSKEY_DEPTHS,
                    seed: int = 0) -> list[PasskeyPrompt]:
    return [passkey_prompt(tokenizer, n, d, seed) for n in lengths for d in depths]


def passkey_correct(answer: str, key: str) -> bool:
    """The answer is right when the digits it contains, read in order, contain the key."""
    return key in re.sub(r"\D", "", answer)


@dataclass(frozen=True)
class Method:
    """One way to run the model: its own forward (options None) or compiled by kvfx with `options`;
    with a static cache, or with the cache `make_cache(config, max_cache_len)` builds.

    `series` names a curve (a method at every budget), `budget` is its point on the x axis: the
    fraction (or count) of tokens kept, or of pages read for quest; None for a full cache."""

    label: str
    series: str
    options: Mapping[str, Any] | None = None
    make_cache: Callable[[Any, int], Any] | None = field(default=None, compare=False)
    budget: float | int | None = None

    def unavailable(self) -> str | None:
        """Why kvfx cannot run this method (KVConfig's message), or None when it can."""
        if self.options is None:
            return None
        try:
            KVConfig.from_options(dict(self.options))
        except KVConfigError as e:
            return str(e)
        return None

    def new_cache(self, config, max_cache_len: int):
        if self.make_cache is not None:
            return self.make_cache(config, max_cache_len)
        return StaticCache(config=config, max_cache_len=max_cache_len)


EAGER = Method("eager fp", "eager fp")


def kvfx_method(**options: Any) -> Method:
    """A kvfx method named from its options: "kvfx int4", "kvfx snapkv + int4 @ 0.2"."""
    kv, policy = options.get("kv", "none"), options.get("policy", "none")
    if policy == "none":
        series = f"kvfx {kv}"
    else:
        series = f"kvfx {policy}" + (f" + {kv}" if kv != "none" else "")
    budget = options.get("pages") if policy == "quest" else options.get("budget")
    return Method(series + (f" @ {budget:g}" if budget is not None else ""), series, dict(options), budget=budget)


@contextmanager
def running(model, method: Method) -> Iterator[None]:
    """Inside the block, model.forward is the method's: the model's own, or compiled by kvfx."""
    if method.options is None:
        yield
        return
    # A fresh dynamo state per method: each compile would otherwise count against dynamo's per-function
    # recompile limit, past which it silently runs the model eagerly, which would measure the wrong thing.
    torch._dynamo.reset()
    had_own_forward = "forward" in vars(model)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="kvfx", options=dict(method.options))
    try:
        yield
    finally:
        if had_own_forward:
            model.forward = eager_forward
        else:
            del model.forward


def _kvfx_facts(model, method: Method) -> dict:
    """What kvfx did, read while the method's cache is alive: a row whose sites were not all rewritten
    measured (partly) the model's own attention, and says so."""
    if method.options is None:
        return {}
    rep = kvfx.report(model)
    return {"sites_found": rep.found, "sites_rewritten": rep.rewritten, "kv_bytes": rep.kv_bytes,
            "fp_kv_bytes": rep.fp_kv_bytes}


def _method_fields(method: Method) -> dict:
    return {"method": method.label, "series": method.series, "budget": method.budget,
            "options": dict(method.options) if method.options is not None else None}


@dataclass
class Evaluation:
    rows: list[dict]                       # one per (method, prompt) or per method
    skipped: list[dict]                    # {"method", "reason"} for each method kvfx could not run


def _available(methods: Sequence[Method]) -> tuple[list[Method], list[dict]]:
    runnable, skipped = [], []
    for m in methods:
        reason = m.unavailable()
        if reason is None:
            runnable.append(m)
        else:
            skipped.append({"method": m.label, "reason": reason})
    return runnable, skipped


def answer_passkey(model, tokenizer, prompt: PasskeyPrompt, method: Method, max_new_tokens: int = ANSWER_TOKENS,
                   prefill_chunk: int | None = None) -> tuple[str, dict]:
    """Greedy answer of `model` (its forward already set up by `running`) and kvfx's facts. The prompt
    goes in one call through `generate`, or (`prefill_chunk`) in calls of that many tokens, as a server's
    chunked prefill sends it, then greedy steps up to the first end-of-sequence token."""
    ids = torch.tensor([prompt.ids], device=model.device)
    cache = method.new_cache(model.config, ids.shape[1] + max_new_tokens)
    with torch.no_grad():
        if prefill_chunk is None:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **{CACHE_KWARG: cache}, pad_token_id=tokenizer.eos_token_id)
            new = out[0, ids.shape[1]:]
        else:
            logits, _ = decode_steps(model, ids, max_new_tokens, cache=cache, prefill_chunk=prefill_chunk)
            new = logits[:, 0].argmax(-1)
            ends = (new == tokenizer.eos_token_id).nonzero()
            new = new[:int(ends[0]) + 1] if len(ends) else new  # generate stops there too
    facts = _kvfx_facts(model, method)  # the cache is alive here: its bytes are counted
    return tokenizer.decode(new, skip_special_tokens=True), facts


def evaluate_passkey(model, tokenizer, prompts: Sequence[PasskeyPrompt], methods: Sequence[Method],
                     progress: bool = True, prefill_chunk: int | None = None) -> Evaluation:
    """One row per (method, prompt); `prefill_chunk`: each prompt goes in calls of that many tokens
    (`answer_passkey`), and every row records it."""
    runnable, skipped = _available(methods)
    rows = []
    # A fresh compile per method and prompt length: on a second length dynamo recompiles prefill and
    # decode with symbolic prompt and cache sizes, which costs more than compiling the new length afresh
    # (SmolLM2, snapkv @ 0.2, shared 2-core CPU: two 2K prompts after 1K ones took 384 + 99 s in the
    # same dynamo session, 181 + 45 s after a reset).
    by_length: dict[int, list[PasskeyPrompt]] = {}
    for prompt in prompts:
        by_length.setdefault(prompt.length, []).append(prompt)
    with tqdm(total=len(runnable) * len(prompts), desc="passkey", unit="prompt", disable=not progress) as bar:
        for method in runnable:
            bar.set_postfix_str(method.label)
            for group in by_length.values():
                with running(model, method):
                    for prompt in group:
                        answer, facts = answer_passkey(model, tokenizer, prompt, method, prefill_chunk=prefill_chunk)
                        rows.append({"task": "passkey", **_method_fields(method), "prefill_chunk": prefill_chunk,
                                     "length": prompt.length,
                                     "tokens": len(prompt.ids), "depth": prompt.depth, "key": prompt.key,
                                     "answer": answer, "correct": passkey_correct(answer, prompt.key), **facts})
                        bar.update(1)
    return Evaluation(rows, skipped)


def text_ids(path: str, tokenizer) -> torch.Tensor:
    """The token ids [N] of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_nll(model, ids: torch.Tensor, prefix: int, tokens: int, cache=None) -> torch.Tensor:
    """Negative log-likelihood [tokens] of ids[prefix : prefix + tokens], each predicted by a decode step
    that reads the cache (prefill ids[:prefix], then teacher-forced one-token steps)."""
    if prefix < 1 or tokens < 1 or prefix + tokens > ids.numel():
        raise ValueError(f"perplexity needs 1 <= prefix and 1 <= tokens with prefix + tokens <= {ids.numel()} "
                         f"(the text's tokens); got prefix={prefix}, tokens={tokens}")
    ids = ids.to(model.device)
    targets = ids[prefix:prefix + tokens]
    logits = teacher_forced_logits(model, ids[:prefix].unsqueeze(0), targets, cache)
    return F.cross_entropy(logits.float(), targets, reduction="none")


@dataclass
class Agreement:
    """A generation through kvfx against the model without it, teacher-forced on the same tokens."""

    tokens: int                      # new tokens compared
    agree: int                       # of them, those that are the fp model's top-1 there as well
    first_disagreement: int | None   # index (0 = the first new token) of the first that is not
    mean_kl: float                   # mean KL(fp || kvfx) of the next-token distributions, nats

    def __str__(self) -> str:
        first = "none" if self.first_disagreement is None else f"new token {self.first_disagreement + 1}"
        return (f"against the model without kvfx (one teacher-forced pass over these tokens): its top-1 is the "
                f"token kvfx chose at {self.agree} of {self.tokens} ({100 * self.agree / self.tokens:.1f}%; first "
                f"disagreement: {first}), mean KL(fp || kvfx) {self.mean_kl:.2e} nats")


@torch.no_grad()
def agreement_with_fp(forward: Callable, sequence: torch.Tensor, prompt_len: int,
                      step_logits: Sequence[torch.Tensor]) -> Agreement:
    """Compare one row's generation, `sequence` [1, P + N] (prompt of P tokens, then the N chosen ones) with
    kvfx's logits of each step ([1, V] each, as `generate(output_logits=True)` gives them), against
    `forward` (the model's forward without kvfx) run once over the whole sequence without a cache."""
    chosen = sequence[0, prompt_len:]
    n = min(chosen.numel(), len(step_logits))
    if n == 0:
        raise ValueError("no new tokens to compare")
    fp = forward(input_ids=sequence[:, :prompt_len + n], use_cache=False).logits[0, prompt_len - 1:-1].float()
    ours = torch.cat([logit[:1] for logit in step_logits[:n]]).float().to(fp.device)
    agree = fp.argmax(-1) == chosen[:n]
    misses = (~agree).nonzero()
    kl = F.kl_div(ours.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="none").sum(-1).clamp(min=0)
    # (clamped: equal distributions round to about -1e-9, and a KL is never below 0)
    return Agreement(n, int(agree.sum()), int(misses[0]) if misses.numel() else None, kl.mean().item())


def perplexity(model, ids: torch.Tensor, prefix: int, tokens: int, cache=None) -> float:
    """exp(mean NLL) of `tokens` tokens after a `prefix`-token prefill (see `token_nll`)."""
    return token_nll(model, ids, prefix, tokens, cache).mean().exp().item()


def evaluate_perplexity(model, ids: torch.Tensor, prefix: int, tokens: int, methods: Sequence[Method],
                        progress: bool = True) -> Evaluation:
    runnable, skipped = _available(methods)
    rows = []
    for method in tqdm(runnable, desc="perplexity", unit="method", disable=not progress):
        with running(model, method):
            cache = method.new_cache(model.config, prefix + tokens)
            nll = token_nll(model, ids, prefix, tokens, cache)
            rows.append({"task": "perplexity", **_method_fields(method), "prefix": prefix, "tokens": tokens,
                         "nll": nll.mean().item(), "perplexity": nll.mean().exp().item(),
                         **_kvfx_facts(model, method)})
            del cache
    return Evaluation(rows, skipped)
