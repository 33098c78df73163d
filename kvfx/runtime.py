"""Who owns the KV memory at run time.

With a quantized format, each fp cache buffer the model allocated is paired with a `KVStore` that
kvfx allocates, and the buffer's memory is freed (``untyped_storage().resize_(0)``, as FSDP does):
the tensor keeps its shape, dtype and device, so the model's bookkeeping still works, but holds no
bytes. Its class becomes `FreedKVBuffer`, whose eager use raises a clear `KVFXError` instead of
reading freed memory (compiled code, which dynamo traces with torch functions disabled, sees a
plain tensor and never reads it: the rewritten graph uses the store).

Stores are found by the identity of the buffer the model passes in, so two caches in flight never
mix, and a new cache (a new `generate`) starts with a new, clean store. They live exactly as long as
the buffer does (weak keys).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from kvfx.cat_store import CatStore, GrowingStore
from kvfx.errors import KVFXError
from kvfx.kernels.formats import KVStore
from kvfx.kernels.kivi import KiviStore, dequantize_reference
from kvfx.kernels.token_store import TokenStore
from kvfx.passes.cat_cache import UNBOUNDED, CatSlot
from kvfx.passes.rewrite import GraphPlan, StoreSlot
from kvfx.reporting import Session

_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride,
    torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.is_contiguous, torch.Tensor.__repr__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.layout.__get__, torch.Tensor.is_floating_point,
    torch.Tensor.untyped_storage, torch.Tensor.data_ptr,
}

# fp buffer (key or value) -> the store that holds its data. Shared by every compiled graph.
_STORES: WeakIdKeyDictionary = WeakIdKeyDictionary()
# A store that keeps only what the newest cache grown from it holds (a policy's, a KIVI one's, a sliding
# window's) -> a weak reference to that cache's key placeholder.
_NEWEST: WeakIdKeyDictionary = WeakIdKeyDictionary()


class FreedKVBuffer(torch.Tensor):
    """A cache buffer whose memory kvfx freed after moving its data into a quantized store."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Property getters (shape, is_cuda, ...) and metadata methods read no data; dynamo calls several
        # (which, varies by torch version) while it wraps the model's inputs, inside a TracingContext.
        if (func in _METADATA or getattr(func, "__name__", "") in ("__get__", "_is_view")
                or torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        raise KVFXError(
            f"this KV-cache buffer was freed by kvfx (its tokens live quantized in kvfx's store), so "
            f"'{name}' cannot read or write it; run the model through the kvfx-compiled forward, or use "
            f"kvfx.runtime.dequantized(buffer) to read the cache")

    def __repr__(self) -> str:
        return f"FreedKVBuffer(shape={tuple(self.shape)}, dtype={self.dtype}, held by kvfx)"


def free(buffer: torch.Tensor) -> None:
    buffer.untyped_storage().resize_(0)
    buffer.__class__ = FreedKVBuffer


def freed_placeholder(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor shaped like `like`, in `dtype`, that holds no memory: what the model gets back in
    place of the fp buffer it expected."""
    buffer = torch.empty(like.shape, dtype=dtype, device=like.device)
    free(buffer)
    return buffer


def dequantized(buffer: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """The cache content a freed key or value buffer stands for, in the model dtype: all slots of an
    int8 store; the first `length` tokens of a KIVI store (which keeps no length of its own). A policy's
    store holds tokens by slot, not a cache by position: it raises."""
    store, is_key = _STORES.get(buffer, (None, None))
    if store is None:
        raise KVFXError("this tensor is not a KV-cache buffer held by kvfx")
    if isinstance(store.store if isinstance(store, GrowingStore) else store, TokenStore):
        raise KVFXError("a policy's store holds the tokens it keeps one per slot, not a cache by position: read "
                        "kvfx.runtime.store_of(buffer) (its slot_pos gives each slot's position, -1 an empty one)")
    if isinstance(store, (KVStore, CatStore, GrowingStore)):
        keys, values = store.dequantize(buffer.dtype)
    elif length is None:
        raise KVFXError("a KIVI store keeps no length: call kvfx.runtime.dequantized(buffer, length=<tokens>)")
    else:
        keys, values = dequantize_reference(store, length, buffer.dtype)
    return keys if is_key else values


def store_of(buffer: torch.Tensor) -> Any:
    """The store that holds a cache buffer's tokens (None: kvfx holds none for it, as with kv="none",
    where the model's buffer is the cache)."""
    return _STORES.get(buffer, (None, None))[0]


def held_bytes(buffers) -> int:
    """Bytes really held for the model's cache `buffers` (keys and values): their own storages plus,
    for buffers kvfx freed, the stores that hold their tokens (each counted once)."""
    stores = {}
    total = 0
    for buffer in buffers:
        total += buffer.untyped_storage().nbytes()
        store = store_of(buffer)
        if store is not None:
            stores[id(store)] = store
    return total + sum(s.nbytes() for s in stores.values())


def store_for_inputs(key: torch.Tensor, value: torch.Tensor, fmt, layer: int = 0, layers: int = 1) -> Any:
    """The store of the cache the model passed in; a cache kvfx has not seen yet is adopted:
    its current content is quantized and its fp memory freed."""
    found = _STORES.get(key)
    if found is not None:
        return found[0]
    if isinstance(key, FreedKVBuffer) or isinstance(value, FreedKVBuffer):
        raise KVFXError("a KV-cache buffer freed by kvfx has lost its store; create a new cache")
    store = fmt.adopt(key, value, layer, layers)
    free(key)
    free(value)
    _register(key, value, store)
    return store


def _register(key: torch.Tensor, value: torch.Tensor, store: Any) -> None:
    _STORES[key] = (store, True)
    _STORES[value] = (store, False)


def make_runner(compiled: Callable, plan: GraphPlan, session: Session, fmt) -> Callable:
    """Wrap an inductor-compiled graph so that each call gets its sites' stores as extra inputs."""
    raw_reads, full_window = plan.raw_read_inputs, set(plan.full_window_inputs)
    inputs = [s for s in plan.slots if s.key_input is not None]
    returned = [s for s in plan.slots if s.store_output is not None]
    cat_slots = plan.cat_slots

    store_inputs = {i for s in inputs for i in (s.key_input, s.value_input)}

    def run(*args: Any) -> Any:
        for i in raw_reads:
            if isinstance(args[i], FreedKVBuffer):
                _read_back(args[i], i, i in store_inputs, i in full_window, session)
        stores = []
        for slot in inputs:
            key, value = args[slot.key_input], args[slot.value_input]
            stores.append(store_for_inputs(key, value, fmt, slot.layer, plan.layers))
            session.caches[key] = (value, stores[-1])
        grown = [_cat_store_view(slot, args, fmt, plan.layers) for slot in cat_slots]
        outputs = compiled(*args, *(t for s in stores for t in s.tensors()),
                           *(t for _, _, view in grown for t in view))
        if returned or grown:
            outputs = list(outputs)
            for slot in returned:
                tensors = outputs[slot.store_output:slot.store_output + slot.store_tensors]
                _hand_back(outputs, slot, fmt.from_tensors(tensors), session)
            for slot, (store, length, _) in zip(cat_slots, grown):
                _hand_back_grown(outputs, slot, store, length, session)
            outputs = outputs[:plan.outputs]
        _record_fp_caches(plan, args, outputs, session)
        return outputs

    return run


def _read_back(buffer: torch.Tensor, index: int, also_rewritten: bool, full: bool, session: Session) -> None:
    """A graph reads a buffer kvfx froze outside any rewritten site (HF's full static sliding-window
    layer rolls its buffer, which only int8 stores follow; or overwrites it whole with copy_): the buffer
    gets its fp memory back, filled with its store's tokens, and the cache goes on unquantized (the report
    names the site). A KIVI store keeps no length: it is read back only where the graph rolls the buffer,
    which HF does only once every slot is written (`full`)."""
    store = store_of(buffer)
    readable = isinstance(store, KVStore) or (isinstance(store, KiviStore) and full)
    if also_rewritten or not readable or not buffer.is_contiguous():
        raise KVFXError(
            f"graph input {index} is a KV-cache buffer that kvfx freed, and this graph reads it "
            f"outside a rewritten attention site; see kvfx.report(...) for the site's reason")
    content = dequantized(buffer, None if isinstance(store, KVStore) else buffer.shape[2])
    with torch._C.DisableTorchFunctionSubclass():
        buffer.__class__ = torch.Tensor
        buffer.untyped_storage().resize_(buffer.numel() * buffer.element_size())
        buffer.copy_(content)
    del _STORES[buffer]
    for key, (value, held) in list(session.caches.items()):
        if held is store and (buffer is key or buffer is value):  # the cache's bytes are the fp buffers from now on
            session.caches[key] = (value, None)


def _hand_back(outputs: list, slot: StoreSlot, store: Any, session: Session) -> None:
    """Give the model freed placeholders for the buffers its graph allocated; kvfx keeps the store."""
    key, value = (freed_placeholder(outputs[i], slot.dtype) for i in (slot.key_output, slot.value_output))
    _register(key, value, store)
    session.caches[key] = (value, store)
    outputs[slot.key_output], outputs[slot.value_output] = key, value


def _cat_store_view(slot: CatSlot, args: tuple, fmt, layers: int) -> tuple[Any, int, tuple[torch.Tensor, ...]]:
    """The store a concatenated cache grows in this call, its length after the call, and the tensors
    the graph reads and writes: the view of its first `length` slots (int8), or a KIVI store sized for
    `length` / a policy's whole `TokenStore`, then a carrier of the length (uint8 [length], never read); a
    sliding window's KIVI store is sized for `length` + G and followed by the carrier and its offset."""
    batch, heads, length, head_dim = (size(args) for size in slot.shape)
    past = [None if i is None else args[i] for i in (slot.key_past_input, slot.value_past_input)]
    if past[0] is not None and past[0].dim() == 4:
        store = _past_store(*past, fmt, slot, layers)
    else:  # the graph starts the cache (or HF's empty 1-D start)
        store = _new_cat_store(slot, fmt, batch, heads, head_dim, layers)
    if slot.kind == "int8":
        return store, length, store.view(length).tensors()
    carrier = torch.empty(length, dtype=torch.uint8, device=slot.device)
    if slot.margin:  # a sliding window's KIVI store: the cache's first token sits `offset` positions in
        offset = store.length - (past[0].shape[2] if store.length else 0)
        store.offset.fill_(offset)
        return store, offset + length, (*store.view(length + slot.margin), carrier, store.offset)
    tensors = store.tensors() if slot.kind == "policy" else store.view(length)
    return store, length, (*tensors, carrier)


def _past_store(key: torch.Tensor, value: torch.Tensor, fmt, slot: CatSlot, layers: int) -> Any:
    found, found_value = _STORES.get(key), _STORES.get(value)
    if found is not None:
        store = found[0]
        if found_value is None or found_value[0] is not store:
            raise KVFXError("the key and value caches passed in were not grown together by kvfx")
        if slot.kind != "int8" or store.start:  # the store keeps only what the newest cache grown from it holds
            newest = _NEWEST.get(store)
            if newest is None or newest() is not key:
                raise KVFXError("this cache is older than the newest one grown from it, and kvfx keeps only the "
                                "newest's tokens (a policy evicts, a sliding window drops its oldest, KIVI "
                                "quantized them as they left its residual); continue from the newest cache")
            if slot.kind == "int8":
                store.drop_front()
            return store
        # A past shorter than the store: the caller went back to an earlier cache (e.g. kept an old
        # `past`); the tokens after it belong to the newer cache, so it continues in a copy.
        return store if store.length == key.shape[2] else store.fork(key.shape[2])
    if isinstance(key, FreedKVBuffer) or isinstance(value, FreedKVBuffer):
        raise KVFXError("a KV-cache tensor freed by kvfx has lost its store; create a new cache")
    b, h, _, d = key.shape
    if slot.kind in ("policy", "grown"):  # a past built without kvfx: the policy must see its tokens arrive
        fmt.adopt(key, value, slot.layer, layers)  # (raises unless the past is empty)
        return _new_cat_store(slot, fmt, b, h, d, layers)
    store = _new_cat_store(slot, fmt, b, h, d, layers)
    store.adopt(key, value)  # a past built without kvfx: its tokens are quantized into the store
    return store


def _new_cat_store(slot: CatSlot, fmt, batch: int, heads: int, head_dim: int, layers: int) -> Any:
    """An empty store of the slot's kind: an evicting policy's capacity is its integer budget (`UNBOUNDED`)."""
    if slot.kind == "policy":
        return fmt.allocate((batch, heads, UNBOUNDED, head_dim), slot.dtype, slot.device, slot.layer, layers)
    if slot.kind == "int8":
        return CatStore(fmt, batch, heads, head_dim, slot.dtype, slot.device)
    return GrowingStore(fmt, batch, heads, head_dim, slot.dtype, slot.device, slot.layer, layers)


def _hand_back_grown(outputs: list, slot: CatSlot, store: Any, length: int, session: Session) -> None:
    """The graph returned one-element stride-0 tensors shaped like the grown K/V: they become the
    freed placeholders the caller keeps as its cache, registered to the store."""
    key, value = outputs[slot.key_output], outputs[slot.value_output]
    if slot.kind != "policy":
        store.length = length
    if slot.keep is not None and slot.kind == "policy":  # the next call numbers positions from its cache's first
        store.drop_positions(max(length - slot.keep, 0))
    elif slot.keep is not None:
        store.keep_last(slot.keep)
    if slot.kind != "int8" or slot.keep is not None:
        _NEWEST[store] = weakref.ref(key)
    for tensor in (key, value):
        free(tensor)
    _register(key, value, store)
    session.caches[key] = (value, store)


def cat_store_examples(plan: GraphPlan) -> list[torch.Tensor]:
    """Example values for the store-view inputs the rewrite added for concatenated caches: the fake
    tensors the graph was rewritten with (sized by dynamo's symbols). A real tensor would be
    fakeified afresh by AOTAutograd, with new symbols that no guard can name."""
    return [t for slot in plan.cat_slots for t in slot.examples]


def _record_fp_caches(plan: GraphPlan, args: tuple, outputs: Any, session: Session) -> None:
    """kv="none": the model's own buffers are the cache; remember them for the byte count."""
    for tensors, pairs in ((args, plan.fp_cache_inputs), (outputs, plan.fp_cache_outputs)):
        for key_index, value_index in pairs:
            session.caches[tensors[key_index]] = (tensors[value_index], None)
