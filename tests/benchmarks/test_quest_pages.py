"""benchmarks/quest_pages.py's torch replay of Quest's selection: its keys rank pages as the kernel does,
and its reduction count follows the bisection on bits (ties run it to the end, an exact count stops it)."""
import pathlib

import pytest
import torch

from kvfx.kernels.quest import quest_select

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import quest_pages

    return quest_pages


@pytest.mark.parametrize("pool", [1, 3])
def test_replayed_keys_rank_pages_as_the_select_kernel(bench, pool):
    gen = torch.Generator().manual_seed(pool)
    heads, n_pages, k = 3, 100, 17
    scores = torch.tensor([-1.0, 0.0, 0.5, 2.0])[torch.randint(0, 4, (heads, n_pages), generator=gen)]
    newest = torch.randperm(4 * heads * n_pages, generator=gen)[:heads * n_pages].view(heads, n_pages).int()
    newest[:, ::7] = -1  # pages without tokens
    scores = scores.masked_fill(newest < 0, -3.0e38)
    got = quest_select(scores, newest, 1, k, pool)[0]
    key = bench.order_keys(scores, newest, pool)
    best = torch.sort(-key, dim=-1, stable=True).indices[:, :k].sort(-1).values  # ties: lower pages first
    assert torch.equal(got, torch.cat([best, newest.argmax(-1, keepdim=True)], -1).int())


def test_ties_run_the_bit_search_to_the_end(bench):
    tied = torch.full((2, 64), 1000, dtype=torch.int64)
    assert bench.search_reductions(tied, 10) == 32


def test_the_search_takes_at_most_32_reductions_and_stops_on_an_exact_count(bench):
    keys = torch.randperm(1 << 20, generator=torch.Generator().manual_seed(0))[:512].view(2, 256).long() - (1 << 19)
    assert 1 <= bench.search_reductions(keys, 40) < 32  # distinct keys: an exact count stops it early
    assert 1 <= bench.search_reductions(keys, 0) <= 32  # K = 0: it climbs past the largest key
