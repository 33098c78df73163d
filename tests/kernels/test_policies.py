"""Policies on a TokenStore: what is kept, what is attended, and that nothing else changes."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kvfx
import kvfx.kernels  # noqa: F401  (registers the ops)
import kvfx.kernels.policies as policies
from kvfx.kernels.attention import attend_reference
from kvfx.kernels.kivi import round_e4m3_outward
from kvfx.kernels.policies import (PolicySpec, attend_candidates, attend_prompt, choose_kept, policy_attend_reference,
                                   quest_pages)
from kvfx.kernels.token_store import TokenCodec

EVICTING = ["streaming", "h2o", "snapkv", "pyramidkv"]


def make_store(cache_len, b=2, hkv=2, d=32, layer=0, layers=2, **options):
    fmt = kvfx.KVConfig(**options).format
    return fmt, fmt.allocate((b, hkv, cache_len, d), torch.float32, torch.device("cpu"), layer, layers)


def run(fmt, store, q, k, v, start, mask=None, layer=0, layers=2, causal=True):
    """One call for the tokens [start, start + T) of the full sequences q, k, v."""
    t = q.shape[2]
    pos = torch.arange(start, start + t)
    return policy_attend_reference(q, k, v, pos, store, mask, causal and mask is None, 0.3, fmt.spec, layer, layers)


def held(store):
    """Per (row, head) the sorted positions the store holds."""
    b, h, _ = store.slot_pos.shape
    return [[sorted(p for p in store.slot_pos[i, j].tolist() if p >= 0) for j in range(h)] for i in range(b)]


def sequence(b, hq, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g),
            torch.randn(b, hkv, n, d, generator=g))


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(EVICTING + ["quest"]), kv=st.sampled_from(["none", "int8", "int4", "int2", "fp8"]),
       b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 3), prompt=st.integers(1, 40),
       steps=st.integers(0, 6), seed=st.integers(0, 99))
def test_budget_covering_every_token_is_attention_over_the_fake_quantized_history(policy, kv, b, hkv, g, prompt,
                                                                                   steps, seed):
    """budget >= all tokens: nothing is evicted, and each call attends exactly over the history,
    older tokens as the format stores them and the new ones at full precision (lossless for "none")."""
    n, d = prompt + steps, 32
    options = dict(kv=kv, group_size=16, policy=policy)
    options.update(pages=1.0) if policy == "quest" else options.update(budget=n, window=1, sink=0)
    fmt, store = make_store(n, b, hkv, d, **options)
    q, k, v = sequence(b, hkv * g, hkv, n, d, seed)
    codec = TokenCodec(kv, 16)
    stored_k, stored_v = (codec.dequantize(*codec.quantize(x), torch.float32) for x in (k, v))
    calls = [(0, prompt)] + [(t, t + 1) for t in range(prompt, n)]
    for t0, t1 in calls:
        got = run(fmt, store, q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], t0)
        keys = torch.cat([stored_k[:, :, :t0], k[:, :, t0:t1]], 2)
        values = torch.cat([stored_v[:, :, :t0], v[:, :, t0:t1]], 2)
        mask = torch.ones(t1 - t0, t1, dtype=torch.bool).tril(t0)
        want = attend_reference(q[:, :, t0:t1], keys, values, mask, -1, False, 0.3)
        torch.testing.assert_close(got, want, atol=2e-5 if kv == "none" else 1e-4, rtol=1e-4)
    assert all(row == list(range(n)) for rows in held(store) for row in rows)


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(EVICTING), budget=st.integers(6, 20), prompt=st.integers(1, 40), steps=st.integers(1, 8),
       seed=st.integers(0, 99))
def test_each_call_attends_exactly_the_kept_tokens_and_the_new_ones(policy, budget, prompt, steps, seed):
    """The output over the store equals plain attention restricted to the positions held before the
    call plus the new tokens; the store never holds more than the budget."""
    b, hkv, g, d = 2, 2, 2, 32
    n = prompt + steps
    fmt, store = make_store(n, b, hkv, d, policy=policy, budget=budget, window=4, sink=2, recent=3)
    q, k, v = sequence(b, hkv * g, hkv, n, d, seed)
    for t0, t1 in [(0, prompt)] + [(t, t + 1) for t in range(prompt, n)]:
        before = held(store)
        got = run(fmt, store, q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], t0)
        for i in range(b):
            for j in range(hkv):
                keys = before[i][j] + list(range(t0, t1))
                mask = torch.tensor([[p <= t for p in keys] for t in range(t0, t1)])
                want = attend_reference(q[i:i + 1, j * g:(j + 1) * g, t0:t1], k[i:i + 1, j:j + 1, keys],
                                        v[i:i + 1, j:j + 1, keys], mask, -1, False, 0.3)
                torch.testing.assert_close(got[i:i + 1, j * g:(j + 1) * g], want, atol=2e-5, rtol=1e-4)
        capacity = store.slot_pos.shape[-1]
        assert all(len(row) <= capacity for rows in held(store) for row in rows)
    if policy != "pyramidkv":  # its layers' budgets differ: tested below
        assert store.slot_pos.shape[-1] == min(budget + (4 if policy == "snapkv" else 0), n)  # + the window


@pytest.mark.parametrize("options", [dict(policy="h2o", budget=12), dict(policy="snapkv", budget=24, window=8),
                                     dict(policy="quest", pages=0.5, page_size=8)])
def test_a_prompt_s_score_matrix_is_bounded_in_elements_with_the_same_result(monkeypatch, options):
    """A large batch's prompt attends in chunks of fewer queries (`BLOCK_ELEMENTS`), which changes
    nothing: the same outputs, kept tokens and scores as 512-query chunks."""
    q, k, v = sequence(2, 4, 2, 40, 16, 7)
    results = []
    for elements in (1 << 28, 2 * 2 * 2 * 30 * 3):  # (b * hkv * g * keys: 3 of the first 30 queries a chunk)
        monkeypatch.setattr(policies, "BLOCK_ELEMENTS", elements)
        fmt, store = make_store(48, 2, 2, 16, **options)
        out = torch.cat([run(fmt, store, q[:, :, :30], k[:, :, :30], v[:, :, :30], 0),
                         run(fmt, store, q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], 30)], 2)
        results.append((out, store.slot_pos.clone(), store.score.clone()))
    (out, pos, score), (out_c, pos_c, score_c) = results
    torch.testing.assert_close(out_c, out)
    assert torch.equal(pos_c, pos)
    torch.testing.assert_close(score_c, score)


@pytest.mark.parametrize("prompt, steps", [(30, 5), (9, 12)])
def test_streaming_keeps_the_sinks_and_the_newest(prompt, steps):
    fmt, store = make_store(prompt + steps, policy="streaming", budget=10, sink=3)
    q, k, v = sequence(2, 4, 2, prompt + steps, 32, 0)
    run(fmt, store, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0)
    for t in range(prompt, prompt + steps):
        run(fmt, store, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t)
    n = prompt + steps
    want = sorted(set(range(3)) | set(range(max(n - 7, 0), n)))
    assert all(row == want for rows in held(store) for row in rows)


def test_h2o_keeps_the_recent_window_and_the_heaviest():
    """H2O keeps the `recent` newest; of the rest, the tokens with the most accumulated attention."""
    b, hkv, d, n = 1, 1, 32, 24
    fmt, store = make_store(n, b, hkv, d, policy="h2o", budget=8, recent=3)
    q, k, v = sequence(b, 1, hkv, n, d, 3)
    k[:, :, 5] = q[:, :, 5:].mean(2) * 4  # a token every later query attends to: a heavy hitter
    run(fmt, store, q[:, :, :16], k[:, :, :16], v[:, :, :16], 0)
    for t in range(16, n):
        run(fmt, store, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t)
    kept = held(store)[0][0]
    assert len(kept) == 8 and {21, 22, 23} <= set(kept) and 5 in kept


@pytest.mark.parametrize("h2o_score, kept", [("sum", {0, 7, 9}), ("mean", {7, 8, 9})])
def test_h2o_score_mean_ranks_per_query_that_has_seen_the_token(h2o_score, kept):
    """"sum" ranks by the accumulated attention, "mean" by it over the queries that have seen the token
    (positions pos .. newest): token 0's 2.0 over 10 queries ranks below token 8's 0.6 over 2."""
    spec = PolicySpec.parse(kvfx.KVConfig(policy="h2o", budget=3, recent=1, h2o_score=h2o_score).to_json())
    score = torch.full((1, 1, 10), 0.1)
    score[..., [0, 7, 8]] = torch.tensor([2.0, 1.0, 0.6])
    chosen, _ = choose_kept(spec, torch.arange(10).view(1, 1, 10), torch.ones(1, 1, 10, dtype=torch.bool), score,
                         torch.tensor([3]))
    assert set(chosen[0, 0].nonzero().flatten().tolist()) == kept


def test_snapkv_keeps_the_observation_window_and_what_it_attends_to():
    b, hkv, d, n = 1, 1, 32, 40
    fmt, store = make_store(n + 8, b, hkv, d, policy="snapkv", budget=10, window=4)
    q, k, v = sequence(b, 1, hkv, n, d, 4)
    k[:, :, 11] = q[:, :, -4:].mean(2) * 4  # the window queries look at token 11
    run(fmt, store, q, k, v, 0)
    kept = held(store)[0][0]
    assert len(kept) == 10 and {36, 37, 38, 39, 11} <= set(kept)
    assert {10, 12} & set(kept)  # pooling keeps a neighbour of a strong token
    more_q, more_k, more_v = sequence(b, 1, hkv, 8, d, 5)
    for i in range(8):  # decoding never evicts the chosen prompt tokens; 4 (window) slots hold new ones
        run(fmt, store, more_q[:, :, i:i + 1], more_k[:, :, i:i + 1], more_v[:, :, i:i + 1], n + i)
    now = held(store)[0][0]
    assert set(kept) <= set(now) and len(now) == 14 and {44, 45, 46, 47} <= set(now)


def snapkv_pooled_scores(q, k, window, pooling, kernel, scale=0.3):
    """SnapKV's scores [Hkv, n - window] of the tokens before the window, as its authors' code makes
    them (one row; the g query heads of a KV head summed, as METHODS.md says): the last `window`
    queries' attention, summed, then pooled (width `kernel`) over those tokens alone."""
    hq, n, _ = q.shape
    hkv = k.shape[0]
    scores = q[:, -window:] @ k.repeat_interleave(hq // hkv, 0).transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(window, n, dtype=torch.bool).triu(n - window + 1), float("-inf"))
    attention = scores.softmax(-1)[..., :n - window].sum(1).view(hkv, hq // hkv, -1).sum(1)
    pool = torch.nn.functional.max_pool1d if pooling == "max" else torch.nn.functional.avg_pool1d
    return pool(attention.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(12, 80), window=st.integers(1, 8), extra=st.integers(1, 12), g=st.integers(1, 3),
       pooling=st.sampled_from(["max", "avg"]), kernel=st.sampled_from([1, 5, 7, 9]), seed=st.integers(0, 999))
def test_snapkv_prompt_selection_is_the_papers(n, window, extra, g, pooling, kernel, seed):
    """A prompt keeps the window and the keep - window tokens with SnapKV's highest pooled scores (as a
    set of scores: max pooling makes plateaus of equal scores, which its code breaks arbitrarily). In
    particular the window's attention to itself does not raise the tokens just before it."""
    keep = min(window + extra, n)
    fmt, store = make_store(n + 4, 1, 2, 32, policy="snapkv", budget=keep, window=window, pooling=pooling,
                            pool_kernel=kernel)
    q, k, v = sequence(1, 2 * g, 2, n, 32, seed)
    run(fmt, store, q, k, v, 0)
    pooled = snapkv_pooled_scores(q[0], k[0], window, pooling, kernel)
    for head, kept in enumerate(held(store)[0]):
        chosen = [p for p in kept if p < n - window]
        assert kept[len(chosen):] == list(range(n - window, n))
        got = pooled[head, chosen].sort().values
        torch.testing.assert_close(got, pooled[head].topk(keep - window).values.sort().values)


def test_pyramidkv_budgets_shrink_with_depth_and_sum_to_the_mean():
    spec = PolicySpec.parse(kvfx.KVConfig(policy="pyramidkv", budget=100, beta=20, window=1).to_json())
    capacities = [spec.capacity(10_000, layer, 8) - spec.window for layer in range(8)]
    assert capacities == sorted(capacities, reverse=True) and capacities[-1] == 5  # top layer: budget / beta
    assert abs(sum(capacities) - 800) <= 8  # rounding up per layer


@settings(max_examples=30, deadline=None)
@given(options=st.sampled_from([dict(policy="streaming", budget=10), dict(policy="snapkv", budget=12, window=4),
                                dict(policy="pyramidkv", budget=0.5, window=3), dict(policy="h2o", budget=10),
                                dict(policy="quest", pages=0.5, page_size=4)]),
       kv=st.sampled_from(["none", "int8", "int4"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 3), first=st.integers(1, 24),
       second=st.integers(2, 16), padded=st.booleans(), rows=st.sampled_from([None, 2]), seed=st.integers(0, 99))
def test_the_op_s_prompt_path_equals_the_reference(options, kv, dtype, b, hkv, g, first, second, padded, rows, seed):
    """`attend_prompt` (SDPA in the model dtype, SnapKV's window statistics alone) against
    `attend_candidates` over two prompt calls (the second over a live store): the same output to the
    dtype's rounding, the same kept tokens and scores. Left padding leaves row 0's first queries seeing
    nothing (zeros, as the reference); rows = 2 chunks the queries."""
    n, d = first + second, 32
    q, k, v = (x.to(dtype) for x in sequence(b, hkv * g, hkv, n, d, seed))
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    if padded:
        mask[0, :, :, :min(3, first)] = False
    fmt = kvfx.KVConfig(kv=kv, **options).format
    results = []
    for attend in (attend_candidates, attend_prompt):
        store = fmt.allocate((b, hkv, n + 4, d), dtype, torch.device("cpu"), 0, 2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(policies, "QUERY_CHUNK", rows or policies.QUERY_CHUNK)
            outs = [policy_attend_reference(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], torch.arange(a, z), store,
                                            mask[:, :, a:z], False, 0.3, fmt.spec, 0, 2, attend=attend)
                    for a, z in ((0, first), (first, n))]
        results.append((torch.cat(outs, 2), store.slot_pos.clone(), store.score.clone()))
    (ref, pos, score), (got, pos_got, score_got) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(pos_got, pos)
    torch.testing.assert_close(score_got, score)


def test_left_padded_rows_select_within_their_own_tokens():
    """Row 1 has 6 padding tokens: none is kept, and a fractional budget applies to its own length."""
    b, hkv, d, n = 2, 2, 32, 30
    fmt, store = make_store(n, b, hkv, d, policy="snapkv", budget=0.5, window=2)
    q, k, v = sequence(b, 4, hkv, n, d, 5)
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    mask[1, :, :, :6] = False
    run(fmt, store, q, k, v, 0, mask=mask)
    rows = held(store)
    assert all(len(r) == 15 for r in rows[0]) and all(len(r) == 12 and min(r) >= 6 for r in rows[1])


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("padded", [False, True])
def test_a_fractional_budget_is_of_the_whole_prompt_however_it_is_chunked(policy, padded):
    """A prompt in chunks keeps as many tokens as in one call: the budget is a share of the tokens the
    newest query has seen (a padded row: its own), not of the last chunk's candidates (which kept 6 of
    64 here at 25%, shrinking with every chunk)."""
    b, hkv, d, n = 2, 2, 32, 64
    q, k, v = sequence(b, 4, hkv, n, d, 7)
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    mask[1, :, :, :8] = False
    counts = []
    for chunk in (n, 16):
        fmt, store = make_store(n, b, hkv, d, policy=policy, budget=0.25, window=4)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            run(fmt, store, q[:, :, rows], k[:, :, rows], v[:, :, rows], start,
                mask=mask[:, :, rows] if padded else None)
        counts.append([[len(h) for h in r] for r in held(store)])
    whole, chunked = counts
    assert whole == chunked
    lengths = torch.tensor([n, n - 8 if padded else n])
    assert [r[0] for r in whole] == fmt.spec.prompt_keep(lengths, 0, 2).tolist()  # 16 (PyramidKV at layer 0: 32)


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("chunk", [16, 23])
def test_a_prompt_in_chunks_keeps_what_one_call_keeps_when_the_store_can_hold_it(policy, chunk):
    """The store holds back its free slots' worth of next-ranked candidates between a prompt's calls.
    With room for the whole prompt (25% of a 256-token cache: 64 slots), every chunk attends over all
    the tokens before it and the last one chooses among all of them: the same outputs, kept tokens and
    scores as one call (session 21's rule, which kept only its budget between chunks, lost them). The
    first decode step then sees only the kept tokens, and empties the held-back slots."""
    b, hkv, d, n = 2, 2, 32, 64
    q, k, v = sequence(b, 4, hkv, n + 1, d, 3)
    results = []
    for size in (n, chunk):
        fmt, store = make_store(4 * n, b, hkv, d, policy=policy, budget=0.25, window=4)
        calls = [slice(a, min(a + size, n)) for a in range(0, n, size)]
        outs = [run(fmt, store, q[:, :, c], k[:, :, c], v[:, :, c], c.start) for c in calls]
        kept, scores = held(store), store.score.masked_fill(store.slot_pos < 0, 0).sort(-1).values
        outs.append(run(fmt, store, q[:, :, n:], k[:, :, n:], v[:, :, n:], n))
        results.append((torch.cat(outs, 2), kept, scores, store.slot_pos))
    (whole, kept, scores, _), (chunked, kept_chunked, scores_chunked, slot_pos) = results
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
    keep = fmt.spec.prompt_keep(torch.tensor([n]), 0, 2).item()  # 16 (PyramidKV at layer 0: 32)
    assert kept_chunked == kept and [len(h) for h in kept[0]] == [keep, keep]
    torch.testing.assert_close(scores_chunked, scores, atol=1e-5, rtol=1e-4)
    assert ((slot_pos >= 0).sum(-1) == keep + 1).all() and (slot_pos >= -1).all()  # the kept ones, the new token


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_held_back_slots_change_no_decode_step(policy):
    """A prompt in one call decodes as if the held-back slots were empty: same outputs and kept tokens,
    step by step, as a copy of the store whose held-back slots were cleared after the prompt."""
    import copy

    b, hkv, d, n, steps = 2, 2, 32, 40, 6
    q, k, v = sequence(b, 4, hkv, n + steps, d, 11)
    fmt, store = make_store(n + steps, b, hkv, d, policy=policy, budget=0.5, window=3)
    run(fmt, store, q[:, :, :n], k[:, :, :n], v[:, :, :n], 0)
    assert (store.slot_pos < -1).any()  # held back: the free slots are full
    cleared = copy.deepcopy(store)
    cleared.score.masked_fill_(cleared.slot_pos < -1, 0.0)
    cleared.slot_pos.masked_fill_(cleared.slot_pos < -1, -1)
    for t in range(n, n + steps):
        outs = [run(fmt, s, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t) for s in (store, cleared)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)  # (more masked slots: rounding)
        assert held(store) == held(cleared) and (store.slot_pos >= -1).all()


def test_quest_reads_only_the_chosen_pages():
    """At decode Quest attends over its top pages (the oldest page, the attention sink's, counts as the
    top one) and the newest page: the output equals attention restricted to those pages' tokens."""
    b, hkv, d, n = 1, 1, 32, 64
    fmt, store = make_store(n, b, hkv, d, layer=5, layers=8, policy="quest", page_size=8, pages=2)
    q, k, v = sequence(b, 2, hkv, n, d, 6)
    run(fmt, store, q[:, :, :63], k[:, :, :63], v[:, :, :63], 0, layer=5, layers=8)
    assert store.page_min.shape == (1, 1, 8, 32)
    torch.testing.assert_close(store.page_max[0, 0, 1], k[0, 0, 8:16].amax(0))
    qt = q[:, :, 63:64]
    bound = torch.maximum(qt[0, :, 0, None] * store.page_min[0, 0], qt[0, :, 0, None] * store.page_max[0, 0]).sum(-1).sum(0)
    top = [0] + (bound[1:7].topk(1).indices + 1).tolist()  # page 0 (the oldest) and page 7 (the newest) are always read
    got = run(fmt, store, qt, k[:, :, 63:64], v[:, :, 63:64], 63, layer=5, layers=8)
    keys = [p for page in sorted(top) for p in range(page * 8, page * 8 + 8)] + list(range(56, 64))
    want = attend_reference(qt, k[:, :, keys], v[:, :, keys], None, -1, False, 0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv, bounds", [("int4", "model"), ("int2", "model"), ("int8", "model"), ("fp8", "model"),
                                        ("int4", "fp8")])
def test_quest_bounds_are_those_of_the_keys_before_quantization(kv, bounds):
    """Quest's page bounds follow the keys as they arrive, not their codes: after a prompt (bulk write)
    and after decode steps (one-token writes, a page filled past its prompt tokens), each page holds
    the min / max of its true keys, which its dequantized keys do not reach; with `page_bounds="fp8"`,
    those rounded outward (the max up, the min down) to e4m3."""
    b, hkv, d, n, prompt = 1, 2, 32, 64, 52
    fmt, store = make_store(n, b, hkv, d, layer=5, layers=8, kv=kv, group_size=16, policy="quest", page_size=8,
                            pages=2, page_bounds=bounds)
    q, k, v = sequence(b, 2 * hkv, hkv, n, d, 7)
    run(fmt, store, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0, layer=5, layers=8)
    for t in range(prompt, prompt + 6):
        run(fmt, store, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t, layer=5, layers=8)
    held_k = k[:, :, :prompt + 6]
    pages = torch.nn.functional.pad(held_k, (0, 0, 0, n - held_k.shape[2]), value=float("nan")).unflatten(2, (-1, 8))
    want_max, want_min = pages.nan_to_num(-torch.inf).amax(3)[:, :, :8], pages.nan_to_num(torch.inf).amin(3)[:, :, :8]
    if bounds == "fp8":
        assert store.page_max.dtype == torch.float8_e4m3fn
        want_max, want_min = round_e4m3_outward(want_max, True), round_e4m3_outward(want_min, False)
    assert torch.equal(store.page_max.float(), want_max.float())
    assert torch.equal(store.page_min.float(), want_min.float())
    from_codes = store.page_max.float().clone()
    store.bound_pages()  # the bounds of the dequantized keys: not the same
    assert not torch.equal(store.page_max.float(), from_codes)


def test_quest_always_reads_the_oldest_page():
    """The oldest page (the attention sink's) is one of the `pages` read even when its bound is the lowest."""
    b, hkv, d, n = 1, 1, 32, 64
    fmt, store = make_store(n, b, hkv, d, layer=5, layers=8, policy="quest", page_size=8, pages=2)
    q, k, v = sequence(b, 2, hkv, n, d, 6)
    k[:, :, :8] = -4 * q[:, :, 63:64].sum(1, keepdim=True)  # page 0's keys point away from the last query: the lowest bound
    run(fmt, store, q[:, :, :63], k[:, :, :63], v[:, :, :63], 0, layer=5, layers=8)
    qt = q[:, :, 63:64]
    bound = torch.maximum(qt[0, :, 0, None] * store.page_min[0, 0], qt[0, :, 0, None] * store.page_max[0, 0]).sum(-1).sum(0)
    assert bound[:7].argmin() == 0
    pages, read = quest_pages(qt[:, :, 0].view(b, hkv, 2, d), store.page_min, store.page_max, store.slot_pos, fmt.spec)
    assert sorted(pages[0, 0].tolist()) == sorted([0, int(bound[1:7].argmax()) + 1, 7]) and read.all()


def test_quest_keeps_first_layers_dense():
    fmt, store = make_store(64, 1, 1, 32, layer=1, layers=8, policy="quest", page_size=8, pages=1)
    q, k, v = sequence(1, 2, 1, 64, 32, 7)
    run(fmt, store, q[:, :, :63], k[:, :, :63], v[:, :, :63], 0, layer=1, layers=8)
    got = run(fmt, store, q[:, :, 63:], k[:, :, 63:], v[:, :, 63:], 63, layer=1, layers=8)
    torch.testing.assert_close(got, attend_reference(q[:, :, 63:], k, v, None, -1, False, 0.3), atol=2e-5, rtol=1e-4)


def test_store_bytes_follow_the_budget_not_the_cache_length():
    small = make_store(4096, policy="h2o", budget=128)[1].nbytes()
    assert small == make_store(65536, policy="h2o", budget=128)[1].nbytes()
    # fp32, D=32: 128 B per K or V token; + 4 B position + 4 B score per slot
    assert small == 2 * 2 * 128 * (2 * 128 + 8)


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_softcapped_policy_attention_is_the_eager_softcapping(policy):
    """Gemma-2's softcap (tanh(s / c) * c before the mask) through `kvfx::policy_attend`, a causal prompt of
    20 then a decode step, with a budget that evicts nothing: `attend_reference`'s softcapped attention over
    every token (tested against the eager softcapping in test_ops.py); without the cap the output differs."""
    config = dict(policy=policy, budget=24, **({"window": 4} if policy == "snapkv" else {}))
    options = kvfx.KVConfig(**config).to_json()
    q, k, v = (x * 3 for x in sequence(2, 4, 2, 21, 32, 5))
    for cap, close in ((2.0, True), (0.0, False)):
        fmt, store = make_store(24, **config)
        outs = [torch.ops.kvfx.policy_attend(q[:, :, :20], k[:, :, :20], v[:, :, :20], torch.arange(20),
                                             *store.tensors(), None, True, 0.3, options, 0, 2, cap),
                torch.ops.kvfx.policy_attend(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], torch.tensor([20]),
                                             *store.tensors(), None, False, 0.3, options, 0, 2, cap)]
        want = attend_reference(q, k, v, None, -1, True, 0.3, 2.0)
        assert torch.allclose(torch.cat(outs, 2), want, atol=1e-5, rtol=1e-5) == close


def test_policy_attend_opcheck():
    fmt, store = make_store(24, policy="h2o", budget=12, kv="int4", group_size=16)
    q, k, v = sequence(2, 4, 2, 20, 32, 8)
    options = kvfx.KVConfig(policy="h2o", budget=12, kv="int4", group_size=16).to_json()
    mask = torch.ones(2, 1, 20, 24, dtype=torch.bool).tril()
    torch.ops.kvfx.policy_attend(q, k, v, torch.arange(20), *store.tensors(), mask, False, 0.3, options, 0, 2)
    q1, k1, v1 = (x[:, :, :1] for x in sequence(2, 4, 2, 1, 32, 9))
    args = (q1, k1, v1, torch.tensor([20]), *store.tensors(), mask[:, :, :1], False, 0.3, options, 0, 2)
    torch.library.opcheck(torch.ops.kvfx.policy_attend.default, args)
    torch.library.opcheck(torch.ops.kvfx.store_alloc.default, ([2, 2, 24, 32], torch.float32, torch.device("cpu"),
                                                               options, 1, 2))


@pytest.mark.parametrize("options, words", [
    ({"policy": "h2o"}, ["'h2o'", "'budget'"]),
    ({"policy": "h2o", "budget": 0}, ["'budget'", "0", ">= 1"]),
    ({"policy": "h2o", "budget": -3}, ["'budget'", "-3"]),
    ({"policy": "h2o", "budget": 1.5}, ["'budget'", "1.5", "(0, 1]"]),
    ({"policy": "h2o", "budget": True}, ["'budget'", "True"]),
    ({"policy": "snapkv", "budget": 16, "window": 32}, ["'window'=32", "budget=16"]),
    ({"policy": "streaming", "budget": 4, "sink": 4}, ["'sink'=4", "budget=4"]),
    ({"policy": "h2o", "budget": 8, "recent": 9}, ["'recent'=9", "budget=8"]),
    ({"policy": "h2o", "budget": 8, "h2o_score": "max"}, ["'h2o_score'", "'max'", "'mean'", "'sum'"]),
    ({"policy": "quest", "pages": 0}, ["'pages'", "0"]),
    ({"policy": "quest", "page_pool": 2}, ["'page_pool'", "2", "odd integer >= 1"]),
    ({"policy": "quest", "page_bounds": "fp16"}, ["'page_bounds'", "'fp16'", "'model'", "'fp8'"]),
    ({"policy": "snapkv", "budget": 0.2, "pooling": "median"}, ["'pooling'", "'median'", "'max'", "'avg'"]),
    ({"policy": "snapkv", "budget": 0.2, "pool_kernel": 8}, ["'pool_kernel'", "8", "odd integer >= 1"]),
    ({"policy": "snapkv", "budget": 0.2, "pool_kernel": 0}, ["'pool_kernel'", "0", "odd integer >= 1"]),
])
def test_bad_policy_options_name_option_value_and_choices(options, words):
    with pytest.raises(kvfx.KVConfigError) as err:
        kvfx.KVConfig.from_options(options)
    for word in words:
        assert word in str(err.value)


@settings(max_examples=30, deadline=None)
@given(policy=st.sampled_from(EVICTING + ["quest"]), kv=st.sampled_from(["none", "int8", "int4", "fp8"]),
       b=st.integers(1, 2), g=st.integers(1, 3), prompt=st.integers(1, 30), steps=st.integers(1, 12),
       budget=st.integers(6, 24), padded=st.booleans(), seed=st.integers(0, 99))
def test_decode_step_equals_the_general_path(policy, kv, b, g, prompt, steps, budget, padded, seed):
    """The copy-free one-token path keeps, evicts, scores and attends exactly as the general one."""
    import copy

    from kvfx.kernels.policies import decode_step

    hkv, d, n = 2, 32, prompt + steps
    options = dict(kv=kv, group_size=16, policy=policy)
    options.update(page_size=4, pages=2) if policy == "quest" else options.update(budget=budget, window=3, sink=2)
    fmt, fast = make_store(n, b, hkv, d, layer=3, layers=4, **options)
    q, k, v = sequence(b, hkv * g, hkv, n, d, seed)
    mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()
    if padded and b > 1:
        mask[1, :, :, : prompt // 2] = False
    run(fmt, fast, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0, mask=mask[:, :, :prompt], layer=3, layers=4)
    slow = copy.deepcopy(fast)
    for t in range(prompt, n):
        args = (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
        want = policy_attend_reference(*args, slow, mask[:, :, t:t + 1], False, 0.3, fmt.spec, 3, 4)
        got = decode_step(*args, fast, mask[:, :, t:t + 1], False, 0.3, fmt.spec, 3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert held(fast) == held(slow)
        torch.testing.assert_close(fast.score, slow.score, atol=1e-5, rtol=1e-4)
        if policy == "quest":
            torch.testing.assert_close(fast.page_min, slow.page_min)
            torch.testing.assert_close(fast.page_max, slow.page_max)


def test_dropped_positions_number_the_window_from_its_first_token():
    """A sliding window moved on by 3: kept tokens and held-back candidates (-2 - p) move 3 positions down,
    those that leave the window leave their slot empty, empty slots stay empty."""
    from kvfx.kernels.token_store import dropped_positions

    slot_pos = torch.tensor([[[0, 2, 3, 7, -1, -2 - 1, -2 - 5, -2 - 3]]], dtype=torch.int32)
    want = torch.tensor([[[-1, -1, 0, 4, -1, -1, -2 - 2, -2 - 0]]], dtype=torch.int32)
    assert torch.equal(dropped_positions(slot_pos, 3), want)
