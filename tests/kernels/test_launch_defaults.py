"""The default launches the H100 sweeps chose, as split counts on a 132-SM GPU.

Each expected count is one a benchmark measured as the best (or within a few percent of it); the
figures are in the docstrings of the rules and in benchmarks/results/decode_attention.json and
policy_attention.json. A change to a rule shows up here beside the measurements that justified it.
"""
import pytest
import torch

from kvfx.kernels import decode_attention, slot_attention
from kvfx.kernels.decode_attention import default_num_splits, int_num_splits
from kvfx.kernels.kivi import KiviStore
from kvfx.kernels.slot_attention import default_slot_splits

H100_SMS, HKV, HQ, D = 132, 8, 32, 128
META = torch.device("meta")  # shapes only: no memory, no GPU


@pytest.fixture(autouse=True)
def h100(monkeypatch):
    monkeypatch.setattr(decode_attention, "sm_count", lambda device: H100_SMS)
    monkeypatch.setattr(slot_attention, "sm_count", lambda device: H100_SMS)


def store(seq: int, bits: int) -> KiviStore:
    return KiviStore.allocate(1, HKV, seq, D, torch.bfloat16, META, bits=bits, residual=0 if bits == 16 else 128)


@pytest.mark.parametrize("batch,seq,want", [(8, 65536, 33), (1, 65536, 64), (1, 4096, 32), (32, 4096, 9)])
def test_the_generic_kernel_asks_for_16_programs_per_sm_up_to_64_splits(batch, seq, want):
    assert default_num_splits(batch * HKV, store(seq, 16), META) == want


@pytest.mark.parametrize("batch,seq,want", [(8, 65536, 72), (8, 16384, 32), (1, 16384, 66), (1, 4096, 32)])
def test_the_int_kernel_keeps_its_measured_split_counts(batch, seq, want):
    assert int_num_splits(batch * HKV, store(seq, 4), META) == want


@pytest.mark.parametrize("codec,batch,seq,want", [
    ("none", 8, 16384, 5), ("none", 8, 65536, 16), ("none", 1, 65536, 33), ("none", 32, 4096, 2),
    ("int8", 8, 16384, 9), ("int8", 8, 65536, 32), (None, 8, 13108, 26)])  # None: a policy store's slots
def test_slot_splits_follow_the_cache_kind(codec, batch, seq, want):
    q = torch.empty(batch, HQ, 1, D, device=META)
    assert default_slot_splits(q, HKV, seq, slot_attention.SLOT_BLOCK_N, positional=codec) == want


@pytest.mark.parametrize("kv,batch,want", [("int4", 8, 13), ("int2", 8, 13), ("fp8", 8, 13), ("none", 8, 9),
                                           ("int8", 8, 26), ("int4", 1, 66)])
def test_store_launch_follows_the_codec(kv, batch, want):
    """An H2O store at 20% of S64K (13,108 slots): the compressed codecs' pipelined launch (one warp,
    32-slot tiles, ~1024-slot splits), bf16's at ~2048-slot splits (the 4-per-SM floor at B8), int8's
    4-warp launch (slot_sweep_store.json, policy_attention.json)."""
    assert set(slot_attention.STORE_LAUNCH) == set(slot_attention.CODECS)
    launch = slot_attention.STORE_LAUNCH[kv]
    q = torch.empty(batch, HQ, 1, D, device=META)
    assert default_slot_splits(q, HKV, 13108, launch.block_n, split_slots=launch.split_slots) == want
