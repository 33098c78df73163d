"""Attention-site coverage over the causal LMs transformers ships: how many sites kvfx rewrites.

For every model type in transformers' causal-LM mapping (or those named with --archs), builds a tiny
random-weight model (2 layers, hidden 64, 4 query / 2 KV heads of 16 dims, where the config has
those fields), generates 3 greedy tokens with a dynamic and with a static cache through a dynamo
backend that runs kvfx's passes on every graph (for kv="none", "int8" and "int4") and then runs the graph
unchanged, and records every site's pattern, whether it was rewritten, and why not. The passes are
exactly the kvfx backend's; inductor is skipped (coverage is about matching, the model zoo test
checks numerics). Writes benchmarks/results/coverage.json.

    python benchmarks/coverage.py                 # every causal LM type (about 10-20 minutes on 2 cores)
    python benchmarks/coverage.py --archs llama gpt2 gemma2
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import resource
import signal
import time
import traceback

import torch

from kvfx.backend import _private_copy
from kvfx.config import KVConfig
from kvfx.passes.rewrite import rewrite_graph

from common import RESULTS, environment, write_json  # benchmarks/common.py (run from benchmarks/ or by path)

# Every depth field set to 2 (MPT's n_layers, the BART family's decoder_layers...), so that no
# architecture weighs 6-12x the others by its default depth; use_cache on (MPT defaults to off: its
# generate then recomputes the whole sequence, with no KV cache for kvfx to find).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
            n_embd=64, n_layer=2, n_layers=2, n_head=4, n_positions=256, d_model=64, num_layers=2, num_heads=4,
            decoder_layers=2, encoder_layers=2, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, use_cache=True, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, attn_layer_period=2, attn_layer_offset=1)  # (Jamba: layer 1 attends)
# The formats measured, with their options: KIVI's group must divide the tiny head dim of 16.
KVS = {"none": {}, "int8": {}, "int4": dict(group_size=16, residual=16)}


class Timeout(Exception):
    pass


def first_two_layers(kinds: list, default_kinds: list) -> list:
    """A per-layer list cut to the tiny depth: its first two entries, unless neither is an attention layer
    (hybrids such as Qwen3-Next open with linear-attention layers, and rebuild the list for the tiny
    depth from its first ones): then the default depth's first layer and its first attention layer, so
    that the tiny model keeps one attention layer for kvfx to find."""
    def attends(kind) -> bool:
        return "attention" in str(kind) and "linear" not in str(kind)

    first_attention = next((kind for kind in default_kinds if attends(kind)), None)
    if any(attends(kind) for kind in kinds[:2]) or first_attention is None:
        return kinds[:2]
    return [default_kinds[0], first_attention]


def tiny_model(model_type: str):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    config = config_class(**{k: v for k, v in TINY.items() if k in defaults})
    for name in ("layer_types", "block_types", "layers_block_type"):  # per-layer lists sized for the default depth
        if isinstance(getattr(config, name, None), list) and not isinstance(getattr(type(config), name, None), property):
            setattr(config, name, first_two_layers(getattr(config, name), defaults.get(name) or []))
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):  # no SDPA path: HF's hand-written (eager) attention
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def run_arch(model_type: str, seconds: int) -> dict:
    result = {"model_type": model_type}
    try:
        signal.alarm(seconds)
        model = tiny_model(model_type)
        result["attn_implementation"] = model.config._attn_implementation
        for cache in ("dynamic", "static"):
            sites = {kv: [] for kv in KVS}

            def backend(gm, example_inputs):
                for kv in KVS:
                    plan = rewrite_graph(_private_copy(gm), KVConfig(kv=kv, **KVS[kv]), graph_index=len(sites[kv]))
                    sites[kv].append([dict(layer=s.layer, pattern=s.pattern, rewritten=s.rewritten, reason=s.reason)
                                      for s in plan.sites])
                return gm.forward

            torch._dynamo.reset()
            forward = model.forward
            model.forward = torch.compile(forward, backend=backend)
            try:
                ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
                model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               cache_implementation="static" if cache == "static" else None)
                result[cache] = {kv: [s for g in sites[kv] for s in g] for kv in KVS}
            except Timeout:
                raise
            except Exception as err:  # noqa: BLE001 - the model itself fails: reported, not fatal
                result[cache] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            finally:
                model.forward = forward
    except Timeout:
        result["error"] = f"timed out after {seconds} s"
    except Exception as err:  # noqa: BLE001
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        result["where"] = traceback.extract_tb(err.__traceback__)[-1].name
    finally:
        signal.alarm(0)
    return result


def summarize(results: list[dict]) -> dict:
    summary = {}
    for kv in KVS:
        found = rewritten = 0
        reasons = collections.Counter()
        for r in results:
            for cache in ("dynamic", "static"):
                for s in r.get(cache, {}).get(kv, []):
                    found += 1
                    rewritten += s["rewritten"]
                    if not s["rewritten"]:
                        reasons[s["reason"]] += 1
        summary[kv] = dict(sites=found, rewritten=rewritten, percent=round(100 * rewritten / max(found, 1), 1),
                           reasons=reasons.most_common())
    with_sites = [r["model_type"] for r in results
                  if any(r.get(c, {}).get("none") for c in ("dynamic", "static"))]
    summary["architectures_with_sites"] = len(with_sites)
    summary["architectures_tried"] = len(results)
    summary["not_run"] = {r["model_type"]: r.get("error") or {c: r[c].get("error") for c in ("dynamic", "static")
                                                             if "error" in r.get(c, {})}
                          for r in results if r["model_type"] not in with_sites}
    return summary


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    parser.add_argument("--seconds", type=int, default=120, help="time limit per architecture")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="address-space limit: a config whose sub-models stay large fails with an error")
    parser.add_argument("--out", default=str(RESULTS / "coverage.json"))
    parser.add_argument("--resume", action="store_true", help="keep the architectures already in --out")
    args = parser.parse_args()

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text())["results"] if args.resume and out.exists() else []
    done, start = {r["model_type"] for r in results}, time.time()
    for model_type in (a for a in args.archs if a not in done):
        results.append(run_arch(model_type, args.seconds))
        write_json(out, json.loads(json.dumps(dict(results=results), default=str)))  # survives a kill
        print(f"[{time.time() - start:6.0f}s] {model_type}: "
              + ", ".join(f"{c} {sum(s['rewritten'] for s in results[-1][c]['int8'])}/{len(results[-1][c]['int8'])}"
                          if "int8" in results[-1].get(c, {}) else f"{c} -" for c in ("dynamic", "static")),
              flush=True)
    report = dict(environment=environment(), summary=summarize(results), results=results)
    write_json(out, json.loads(json.dumps(report, default=str)))
    print(json.dumps(report["summary"], indent=1, default=str))


if __name__ == "__main__":
    main()
