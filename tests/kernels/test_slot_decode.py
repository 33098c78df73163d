"""The fused Triton decode step (TRITON_INTERPRET=1 on CPU) against `decode_step_reference`, step by step."""
import copy
import math
import types

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import example, given, settings

import kvfx
from kvfx.kernels.policies import decode_step_reference, quest_pages
from kvfx.kernels.quest import _quest_select_kernel, quest_pages_triton, select_tiles
from kvfx.kernels import slot_decode
from kvfx.kernels.slot_decode import decode_step_triton

KV_FORMATS = ["none", "int8", "int4", "int2", "fp8"]
POLICIES = ["streaming", "h2o", "snapkv", "pyramidkv", "quest"]


def random_store(fmt, b, hkv, cache_len, d, empty, gen, layer=3, layers=4, ordered=False, held_back=False):
    """A store with `empty` free slots (an int, or a share) and distinct positions below `cache_len` - 8 in random
    slots, with random tokens and scores (SnapKV: some pinned at +inf); `ordered`: older tokens score
    higher (H2O's victim is then the oldest position outside the recent window: its boundary); `held_back`:
    half the free slots hold a prompt's held-back candidates (position p stored as -2 - p), which a decode
    step must neither see nor score, and empties."""
    store = fmt.allocate((b, hkv, cache_len, d), torch.float32, torch.device("cpu"), layer, layers)
    cap = store.slot_pos.shape[-1]
    for codes, params in ((store.k_codes, store.k_params), (store.v_codes, store.v_params)):
        new_codes, new_params = store.codec.quantize(torch.randn(b, hkv, cap, d, generator=gen))
        codes.copy_(new_codes), params.copy_(new_params)
    n = min(max(1, cap - (empty if isinstance(empty, int) else int(cap * empty))), cache_len - 8)
    for i in range(b):
        for j in range(hkv):
            slots = torch.randperm(cap, generator=gen)[:n]
            store.slot_pos[i, j, slots] = torch.randperm(cache_len - 8, generator=gen)[:n].int()
    score = 1.0 - store.slot_pos / cache_len if ordered else torch.rand(b, hkv, cap, generator=gen)
    store.score.copy_(score.masked_fill(store.slot_pos < 0, 0.0))
    if fmt.spec.policy in ("snapkv", "pyramidkv"):
        store.score.masked_fill_((torch.rand(b, hkv, cap, generator=gen) < 0.3) & (store.slot_pos >= 0), math.inf)
    if held_back:
        back = (store.slot_pos < 0) & (torch.rand(b, hkv, cap, generator=gen) < 0.5)
        store.slot_pos.masked_fill_(back, -2 - (cache_len - 8))  # a position no slot holds, before the steps
        store.score.masked_scatter_(back, torch.rand(int(back.sum()), generator=gen))
    if store.page_min.numel():
        store.bound_pages()
    return store


def assert_same_store(got, want):
    for name in ("slot_pos", "k_params", "v_params", "score", "page_min", "page_max"):
        a, b = getattr(got, name), getattr(want, name)
        if a.dtype == torch.float8_e4m3fn:  # Quest's fp8 bounds, rounded outward: bit-exact
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    for name in ("k_codes", "v_codes"):  # bit-exact (fp8 compared as bytes)
        a, b = getattr(got, name), getattr(want, name)
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(POLICIES), kv=st.sampled_from(KV_FORMATS), b=st.integers(1, 2), hkv=st.integers(1, 2),
       g=st.integers(1, 4), budget=st.integers(3, 40), empty=st.sampled_from([0, 1, 2, 0.6]), ordered=st.booleans(),
       mask=st.sampled_from(["none", "causal", "row"]), steps=st.integers(1, 3), sink=st.integers(0, 2),
       group=st.sampled_from([32, 64]), splits=st.sampled_from([None, 3, 11]),
       h2o_score=st.sampled_from(["mean", "sum"]), held_back=st.booleans(), seed=st.integers(0, 99))
def test_fused_step_equals_the_reference(policy, kv, b, hkv, g, budget, empty, ordered, mask, steps, sink, group,
                                         splits, h2o_score, held_back, seed):
    """Output, kept positions, scores, codes and params, Quest's bounds: the same after every step, also
    with many split-K partials (11: the scan and finish kernels read them as one padded tile), with
    splits that hold no slot, and with a prompt's held-back candidates in free slots (emptied)."""
    gen = torch.Generator().manual_seed(seed)
    d, cache_len = 64, 48
    options = dict(kv=kv, group_size=group, policy=policy, h2o_score=h2o_score)
    options.update(page_size=4, pages=3) if policy == "quest" \
        else options.update(budget=min(budget, cache_len - 1), window=min(3, budget - 1), sink=min(sink, budget - 1))
    fmt = kvfx.KVConfig(**options).format
    fast = random_store(fmt, b, hkv, cache_len, d, empty, gen, ordered=ordered,
                        held_back=held_back and policy != "quest")
    slow = copy.deepcopy(fast)
    for t in range(cache_len - steps, cache_len):
        q = torch.randn(b, hkv * g, 1, d, generator=gen)
        k_new, v_new = torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
        pos = torch.tensor([t])
        attn_mask = None
        if mask == "row":  # hides a random tenth of the positions (not the new one)
            attn_mask = torch.rand(b, 1, 1, cache_len, generator=gen) > 0.1
            attn_mask[..., t] = True
        args = (q, k_new, v_new, pos)
        want = decode_step_reference(*args, slow, attn_mask, mask == "causal", 0.3, fmt.spec, 3)
        got = decode_step_triton(*args, fast, attn_mask, mask == "causal", 0.3, fmt.spec, 3, block_s=16,
                                 num_splits=splits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert_same_store(fast, slow)


@pytest.mark.parametrize("layer, scan_in_score", [(0, False), (3, False), (3, True)])  # dense, sparse
@pytest.mark.parametrize("mask", ["causal", "row"])
@pytest.mark.parametrize("kv, page, block_s, bounds", [("none", 4, 16, "model"), ("int4", 4, 16, "fp8"),
                                                       ("none", 3, 8, "fp8"), ("int4", 4, None, "model")])
def test_quest_step_fills_in_order_up_to_capacity_and_past_it(kv, page, block_s, bounds, mask, layer, scan_in_score,
                                                              monkeypatch):
    """Quest's scan chooses the free slot and the victim itself (no select pass): rows filled in order to
    different counts (left padding), stepped until every row is full and past it (the reference then drops
    the oldest token); a row mask that hides old tokens empties their slots, which the next steps refill.
    Sparse layers scan in their own launch, or with `QUEST_SCAN_IN_SCORE` in the page-scoring kernel, in
    blocks of whole pages: several blocks of 16 slots, blocks of 2 pages of 3 slots (not a power of two), or
    the default (one block here). fp8 page bounds: the finish kernel widens them to the new key rounded
    outward, to the reference's bytes."""
    monkeypatch.setattr(slot_decode, "QUEST_SCAN_IN_SCORE", scan_in_score)
    gen = torch.Generator().manual_seed(0)
    d, cache_len, steps, start = 64, 48, 4, 60
    fmt = kvfx.KVConfig(kv=kv, policy="quest", page_size=page, pages=3, page_bounds=bounds).format
    fast = fmt.allocate((3, 2, cache_len, d), torch.float32, torch.device("cpu"), layer, 4)
    cap = fast.slot_pos.shape[-1]
    for codes, params in ((fast.k_codes, fast.k_params), (fast.v_codes, fast.v_params)):
        new_codes, new_params = fast.codec.quantize(torch.randn(3, 2, cap, d, generator=gen))
        codes.copy_(new_codes), params.copy_(new_params)
    for row, fill in enumerate((cap - 3, cap - 1, cap)):  # slots 0..fill-1 hold positions start-fill..start-1
        fast.slot_pos[row, :, :fill] = torch.arange(start - fill, start, dtype=torch.int32)
    fast.bound_pages()
    slow = copy.deepcopy(fast)
    for t in range(start, start + steps):
        q = torch.randn(3, 4, 1, d, generator=gen)
        args = (q, torch.randn(3, 2, 1, d, generator=gen), torch.randn(3, 2, 1, d, generator=gen), torch.tensor([t]))
        attn_mask = None
        if mask == "row":  # hides a few old positions (not the new one)
            attn_mask = torch.rand(3, 1, 1, start + steps, generator=gen) > 0.05
            attn_mask[..., t] = True
        want = decode_step_reference(*args, slow, attn_mask, mask == "causal", 0.3, fmt.spec, layer)
        got = decode_step_triton(*args, fast, attn_mask, mask == "causal", 0.3, fmt.spec, layer, block_s=block_s)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert_same_store(fast, slow)
    assert (fast.slot_pos.max(-1).values == start + steps - 1).all()  # every row took the last token
    if kv == "none":  # the bounds still hold every live key of their page (fp8: rounded outward)
        keys = fast.k_codes.view(3, 2, -1, page, d)
        live = (fast.slot_pos >= 0).view(3, 2, -1, page, 1)
        assert (keys.masked_fill(~live, -math.inf) <= fast.page_max.float()[:, :, :, None]).all()
        assert (keys.masked_fill(~live, math.inf) >= fast.page_min.float()[:, :, :, None]).all()


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 4), page=st.sampled_from([2, 4, 5]),
       pages=st.integers(1, 12), cache_len=st.integers(8, 80), empty=st.floats(0.0, 0.95),
       pool=st.sampled_from([1, 3, 5]), bounds=st.sampled_from(["model", "fp8"]), seed=st.integers(0, 99))
def test_quest_kernels_choose_the_reference_pages(b, hkv, g, page, pages, cache_len, empty, pool, bounds, seed):
    gen = torch.Generator().manual_seed(seed)
    fmt = kvfx.KVConfig(policy="quest", page_size=page, pages=pages, page_pool=pool, page_bounds=bounds).format
    store = random_store(fmt, b, hkv, cache_len + 8, 64, empty, gen)
    q = torch.randn(b, hkv * g, 1, 64, generator=gen)
    got = quest_pages_triton(q, store, fmt.spec).long()
    want, read = quest_pages(q.view(b, hkv, g, 64), store.page_min, store.page_max, store.slot_pos, fmt.spec)
    assert torch.equal(got[..., -1], want[..., -1])  # the newest token's page, last
    for i in range(b):
        for j in range(hkv):  # the same live pages (pages without tokens are read as nothing)
            live = set(want[i, j][read[i, j]].tolist())
            mine = got[i, j].tolist()
            assert len(set(mine)) == len(mine)
            assert {p for p in mine if (store.slot_pos[i, j, p * page:(p + 1) * page] >= 0).any()} == live


def _order_keys(scores):
    """The kernel's fp32 -> int32 order (-0.0 below +0.0)."""
    bits = scores.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), n_pages=st.integers(1, 300), share=st.floats(0.0, 1.0),
       kind=st.sampled_from(["distinct", "ties", "few_live", "dead"]), width=st.sampled_from([1, 3, 5]),
       tail=st.booleans(), seed=st.integers(0, 99))
@example(heads=2, n_pages=4097, share=0.125, kind="distinct", width=3, tail=True, seed=0)  # the bench's 4096 + 1
@example(heads=1, n_pages=161, share=0.5, kind="ties", width=1, tail=True, seed=1)  # a full 32-page tail
@example(heads=1, n_pages=130, share=0.3, kind="few_live", width=1, tail=True, seed=2)
def test_quest_select_keeps_the_best_pages_and_the_lowest_ties(heads, n_pages, share, kind, width, tail, seed):
    """The selection kernel alone, to the exact rule: the K pages of highest key (the oldest page, the first
    of the lowest position among live pages, counts as the highest), ties going to the lowest page
    numbers, ascending, then the newest page (the first of the highest position). Distinct scores
    stop the bisection early; ties (few values, -0.0 and +0.0 among them) and pages without tokens
    (DEAD, ranked below every live page, also when fewer than K pages are live) run all 32 steps; K runs
    from 0 to NP - 1, NP past one power of two (tail: a main tile and a tail tile where `select_tiles` makes
    one, else one padded tile). POOL = width > 1: a live page's score is the
    maximum within width // 2 pages of it first (dead neighbours count with their DEAD score)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(int(share * n_pages), n_pages - 1)
    if kind == "distinct":
        scores = torch.randn(heads, n_pages, generator=gen)
    else:
        pool = torch.tensor([-2.5, -0.0, 0.0, 0.5, 0.5, 3.0])
        scores = pool[torch.randint(0, len(pool), (heads, n_pages), generator=gen)]
    live = torch.rand(heads, n_pages, generator=gen) < {"distinct": 0.9, "ties": 0.8, "few_live": 0.1, "dead": 0.0}[kind]
    held = torch.randperm(4 * heads * n_pages, generator=gen)[:heads * n_pages].view(heads, n_pages).int()
    scores, held = scores.masked_fill(~live, -3.0e38), held.masked_fill(~live, -1)
    if width > 1:  # max does not order -0.0 and +0.0: one zero when pooling
        scores = scores + 0.0
    pages = torch.full((heads, k + 1), -7, dtype=torch.int32)
    main, rest = select_tiles(n_pages) if tail else (triton.next_power_of_2(n_pages), 0)
    _quest_select_kernel[(heads,)](scores, held, pages, n_pages, k, MAIN=main, TAIL=rest, POOL=width)
    pooled = F.pad(scores, (width // 2, width // 2), value=float("-inf")).unfold(-1, width, 1).amax(-1)
    scores = torch.where(live, pooled, scores)
    newest = held.argmax(-1)  # the first of the maxima (all -1: page 0)
    oldest = held.masked_fill(~live, 1 << 30).argmin(-1)  # the first of the live minima (none live: page 0)
    key = _order_keys(scores).long()
    key[torch.arange(heads), oldest] = 1 << 40
    key[torch.arange(heads), newest] = -(1 << 40)
    order = torch.sort(-key, dim=-1, stable=True).indices[:, :k]  # stable: lower page numbers first
    want = torch.cat([order.sort(-1).values, newest[:, None]], -1).int()
    assert torch.equal(pages, want)


def test_quest_select_refuses_page_counts_past_16_bits():
    spec = kvfx.KVConfig(policy="quest", page_size=1, pages=8).format.spec
    n = 1 << 16
    store = types.SimpleNamespace(slot_pos=torch.zeros(1, 1, n, dtype=torch.int32),
                                  page_min=torch.zeros(1, 1, 1, 64).expand(1, 1, n, 64),
                                  page_max=torch.zeros(1, 1, 1, 64).expand(1, 1, n, 64))
    with pytest.raises(ValueError, match="16 bits"):
        quest_pages_triton(torch.zeros(1, 1, 1, 64), store, spec)


def test_a_quest_store_past_the_selection_s_page_count_is_refused_up_front():
    """The store refuses a cache the page selection could not count, naming page_size and the fix,
    before any memory is touched (meta device: no allocation)."""
    fmt = kvfx.KVConfig(policy="quest", page_size=16, pages=8).format
    fmt.allocate((1, 1, 16 * 65535, 64), torch.float32, torch.device("meta"))  # the largest it takes
    with pytest.raises(kvfx.KVFXError, match=r"page_size=16 .* 65536 pages per head.*page_size >= 17"):
        fmt.allocate((1, 1, 16 * 65536, 64), torch.float32, torch.device("meta"))
