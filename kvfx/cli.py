"""The `kvfx` command, a thin layer over the Python API.

    kvfx generate --prompt "What is a KV cache?" --kv int4     stream an answer, then speed, KV bytes, report
    kvfx report --kv int8                                     the per-site rewrite table (one short run)
    kvfx eval perplexity --kv none int4 --out results/        the quality harness (kvfx.quality)
    kvfx bench decode-cpu --out results/                      a benchmark script: JSON + PNG in a folder

Errors are one line (a bad option exits with 2); --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

from kvfx.config import KVConfigError
from kvfx.errors import KVFXError

DEFAULT_QUESTION = "What is a KV cache, in two sentences?"
BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
DEFAULT_TEXT = BENCHMARKS / "data" / "lighthouse_keeper.txt"
NOT_BENCHMARKS = ("common", "kvpress_baseline")  # a helper module; a script for kvpress's own venv


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage and exits; kvfx says one line
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _number(text: str) -> int | float:
    """A budget: a token count (int) or a fraction (float)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE, VALUE read as a Python literal when it is one (64, 0.5, True), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# ---------------------------------------------------------------------------------------- arguments

def _common_arguments() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return common


def _model_arguments() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a local transformers folder or a .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--gguf", metavar="FILE", help="the GGUF file inside --model's folder")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    return p


def _one_config_arguments() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("kvfx options (passed to torch.compile(..., backend='kvfx', options=...))")
    g.add_argument("--kv", default="none", help="KV storage: none, int8, int4, int2, fp8 (default: none)")
    g.add_argument("--policy", help="which tokens are kept, e.g. snapkv (see kvfx.KVConfig)")
    g.add_argument("--budget", type=_number, help="tokens kept: a count, or a fraction of the prompt")
    g.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other kvfx option, e.g. -o residual=64 (repeatable)")
    return p


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help=f"the prompt text (default: {DEFAULT_QUESTION!r})")
    g.add_argument("--prompt-file", type=pathlib.Path, help="read the prompt from a file")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is (default: the tokenizer's chat "
                   "template, when it has one)")


FORMATTER = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    common, model = _common_arguments(), _model_arguments()
    parser = _Parser(prog="kvfx", description=__doc__, formatter_class=FORMATTER, parents=[common])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{generate,report,eval,bench,export}")
    _add_generate_and_report(verbs, common, model)
    _add_eval(verbs, common, model)
    _add_bench(verbs, common)
    _add_export(verbs, common, model)
    return parser


def _add_export(verbs, common, model) -> None:
    ex = verbs.add_parser("export", parents=[common], formatter_class=FORMATTER,
                          help="export for a production runtime (ONNX)",
                          description="Export the model with kvfx's cache for another runtime.")
    targets = ex.add_subparsers(dest="target", required=True, metavar="{onnx}")
    onnx = targets.add_parser("onnx", parents=[common, model, _one_config_arguments()], formatter_class=FORMATTER,
                              help="one ONNX graph for prefill and decode, kvfx's cache as explicit inputs/outputs",
                              description="kvfx.export_onnx: the rewritten step (prefill and decode share the graph; "
                                          "the compressed cache tensors are graph inputs and outputs, see "
                                          "docs/ARCHITECTURE.md), runnable with kvfx.lowering.ort_loop.",
                              epilog="example:\n  kvfx export onnx --kv int4 --out smollm2-int4.onnx --max-cache-len 512"
                                     "\n  kvfx export onnx --model ./my-llama --kv int8 --policy streaming "
                                     "--budget 256 --out llama.onnx")
    onnx.add_argument("--out", type=pathlib.Path, required=True, help="the .onnx file to write")
    onnx.add_argument("--max-cache-len", type=int, default=512, help="cache slots of the exported step (512)")
    onnx.add_argument("--batch-size", type=int, default=1)
    onnx.add_argument("--no-optimize", action="store_true",
                      help="skip onnxscript's optimizer (slow on large int4 graphs; onnxruntime optimizes on load)")
    onnx.set_defaults(run=cmd_export_onnx)


def _add_generate_and_report(verbs, common, model) -> None:
    config, formatter = _one_config_arguments(), FORMATTER
    gen = verbs.add_parser("generate", parents=[common, model, config], formatter_class=formatter,
                           help="stream an answer through kvfx, then tokens/s, KV bytes and the report",
                           description="Generate greedily through torch.compile(model.forward, backend='kvfx') "
                                       "with a static cache; the first call compiles (about a minute for "
                                       "SmolLM2 on 2 CPU cores).",
                           epilog='example:\n  kvfx generate --prompt "Name three rivers." --kv int4 '
                                  "--max-new-tokens 64\n  kvfx generate --model ./SmolLM2.gguf --kv int8 "
                                  "--policy snapkv --budget 0.2 --prompt-file question.txt\n"
                                  "  kvfx generate --kv int4 --policy h2o --budget 0.5 --compare")
    _prompt_arguments(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--compare", action="store_true",
                     help="then run the model without kvfx once over the answer and print at how many of its "
                          "tokens its top-1 is kvfx's choice, and the mean KL between the two")
    gen.set_defaults(run=cmd_generate)

    rep = verbs.add_parser("report", parents=[common, model, config], formatter_class=formatter,
                           help="the per-site rewrite table, from one short prefill and decode step",
                           description="Compile the model with kvfx, run a short prompt through the prefill and "
                                       "one decode step (the two graphs generation compiles) and print which "
                                       "attention sites were rewritten into what, or why not.",
                           epilog="example:\n  kvfx report --kv int4\n  kvfx report --model ./my-llama --kv int8 "
                                  "--prefill-only")
    _prompt_arguments(rep)
    rep.add_argument("--prefill-only", action="store_true", help="compile and run the prefill graph only")
    rep.set_defaults(run=cmd_report)


def _add_eval(verbs, common, model) -> None:
    from kvfx import quality_sweep as sweep

    formatter = FORMATTER
    ev = verbs.add_parser("eval", parents=[common], formatter_class=formatter,
                          help="quality: passkey retrieval, perplexity (formats x policies x budgets)",
                          description=sweep.__doc__,
                          epilog="example:\n  kvfx eval perplexity --kv none int8 int4 int2 fp8 --policy none\n"
                                 "  kvfx eval passkey --lengths 1024 2048 --depths 0.1 0.5 0.9 --kv none int4 "
                                 "--policy snapkv --budget 0.1 0.2 --out results/")
    tasks = ev.add_subparsers(dest="task", required=True, metavar="{passkey,perplexity,prompts}")
    methods = _Parser(add_help=False)
    g = methods.add_argument_group("methods (eager fp is measured as the reference, unless --no-eager)")
    g.add_argument("--kv", nargs="*", default=list(sweep.FORMATS), metavar="FMT",
                   help=f"formats with the full cache (default: {' '.join(sweep.FORMATS)}; none at all: --kv)")
    g.add_argument("--policy", nargs="+", default=list(sweep.POLICIES), metavar="P",
                   help=f"policies swept over budgets; 'none' for no policy (default: {' '.join(sweep.POLICIES)})")
    g.add_argument("--budget", nargs="+", type=_number, default=list(sweep.BUDGETS), metavar="B",
                   help=f"budgets of eviction policies (default: {' '.join(map(str, sweep.BUDGETS))})")
    g.add_argument("--pages", nargs="+", type=_number, default=list(sweep.QUEST_PAGES), metavar="F",
                   help="quest: pages read, a count or a fraction (default: 1/16 1/8 3/16 1/4)")
    g.add_argument("--policy-kv", nargs="+", default=list(sweep.POLICY_FORMATS), metavar="FMT",
                   help=f"formats each policy is composed with (default: {' '.join(sweep.POLICY_FORMATS)})")
    g.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="another kvfx option for every kvfx method (repeatable)")
    g.add_argument("--no-eager", action="store_true",
                   help="skip the eager reference (with --merge: the earlier result's is kept)")
    g.add_argument("--quanto-bits", nargs="*", type=int, metavar="BITS",
                   help="also transformers' QuantizedCache (optimum-quanto) at these bits, with kvfx's "
                        "group_size and residual (perplexity default: 4 2; passkey default: none)")
    out = _Parser(add_help=False)
    out.add_argument("--out", type=pathlib.Path, help="folder for quality_<task>.json and .png")
    out.add_argument("--merge", action="store_true",
                     help="keep the rows of --out's earlier result (same settings) for the methods this run "
                          "does not measure: a sweep a few methods at a time")
    out.add_argument("--plot-only", type=pathlib.Path, metavar="JSON",
                     help="print the table and redraw the PNG of an earlier result, then stop")
    grid = _Parser(add_help=False)
    grid.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 7168], metavar="N",
                      help="prompt lengths in tokens (default: 1024 2048 4096 7168)")
    grid.add_argument("--depths", nargs="+", type=float, default=[d / 10 for d in range(1, 10)], metavar="D",
                      help="needle depths, fractions of the prompt (default: 0.1 ... 0.9)")
    grid.add_argument("--seed", type=int, default=0, help="seed of the pass keys")

    pk = tasks.add_parser("passkey", parents=[common, model, methods, grid, out], formatter_class=formatter,
                          help="passkey retrieval accuracy",
                          epilog="example:\n  kvfx eval passkey --lengths 1024 2048 --depths 0.1 0.5 0.9 "
                                 "--kv none int4 --policy none\n  kvfx eval passkey ... --kvpress "
                                 "results/kvpress_passkey.json   (draws kvpress beside kvfx)\n  kvfx eval "
                                 "passkey --lengths 2048 --kv --policy snapkv --budget 0.2 --prefill-chunk 512")
    pk.add_argument("--kvpress", type=pathlib.Path, metavar="JSON",
                    help="results of benchmarks/kvpress_baseline.py on the same prompts, to compare against")
    pk.add_argument("--prefill-chunk", type=_positive, metavar="N",
                    help="send each prompt in calls of N tokens, as a server's chunked prefill does "
                         "(default: one call)")
    pk.set_defaults(run=cmd_eval)
    pp = tasks.add_parser("perplexity", parents=[common, model, methods, out], formatter_class=formatter,
                          help="perplexity of a text, prefilled then teacher-forced through the cache",
                          epilog="example:\n  kvfx eval perplexity --text book.txt --prefix 512 --tokens 256 "
                                 "--kv none int4 int2 --policy none --out results/")
    pp.add_argument("--text", type=pathlib.Path, default=DEFAULT_TEXT,
                    help="a UTF-8 text file (default: benchmarks/data/lighthouse_keeper.txt)")
    pp.add_argument("--prefix", type=int, default=512, help="tokens prefilled (default: 512)")
    pp.add_argument("--tokens", type=int, default=256, help="tokens predicted by decode steps (default: 256)")
    pp.set_defaults(run=cmd_eval)
    pr = tasks.add_parser("prompts", parents=[common, model, grid], formatter_class=formatter,
                          help="write the passkey prompts as JSON (for benchmarks/kvpress_baseline.py)",
                          epilog="example:\n  kvfx eval prompts --lengths 1024 2048 --depths 0.1 0.5 0.9 "
                                 "--file prompts.json")
    pr.add_argument("--file", type=pathlib.Path, required=True, help="where to write the prompts")
    pr.set_defaults(run=cmd_prompts)


def _add_bench(verbs, common) -> None:
    formatter = FORMATTER
    names = ", ".join(_benchmark_names()) or f"none found under {BENCHMARKS}"
    be = verbs.add_parser("bench", parents=[common], formatter_class=formatter,
                          help="run a benchmark script (JSON + PNG into a folder)",
                          description=f"Run benchmarks/<NAME>.py of the source tree with --out FOLDER; arguments "
                                      f"after NAME go to the script. Benchmarks: {names}.",
                          epilog="example:\n  kvfx bench decode-cpu --out /tmp/bench -- --contexts 512 --steps 32\n"
                                 "  kvfx bench decode-attention --out /tmp/bench   (needs a CUDA GPU)")
    be.add_argument("name", metavar="NAME", help=f"one of: {names}")
    be.add_argument("--out", type=pathlib.Path, default=pathlib.Path("kvfx-bench"),
                    help="folder for the JSON and PNG (default: ./kvfx-bench)")
    be.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script (after --)")
    be.set_defaults(run=cmd_bench)


# ------------------------------------------------------------------------------------------- verbs

def _config_options(args) -> dict:
    """The options dict for the backend, validated by KVConfig before anything is loaded."""
    from kvfx.config import KVConfig

    options = {"kv": args.kv}
    if args.policy is not None:
        options["policy"] = args.policy
    if args.budget is not None:
        options["budget"] = args.budget
    options.update(dict(args.option))
    KVConfig.from_options(options)
    return options


def _load(args):
    import torch

    from kvfx.models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    print(f"loading {args.model or args.gguf or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    return load_model(args.model, args.gguf, dtype=dtype, device=device)


def _prompt_ids(args, tokenizer, device):
    text = args.prompt_file.read_text() if args.prompt_file else (args.prompt or DEFAULT_QUESTION)
    if not args.raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("kvfx: error: the prompt is empty")
    return ids.to(device)


def _compile(model, options: dict) -> None:
    import torch

    model.forward = torch.compile(model.forward, backend="kvfx", options=options)


def cmd_generate(args) -> int:
    import torch
    from transformers import StaticCache, TextStreamer

    import kvfx
    from kvfx.decode import CACHE_KWARG, StepClock

    options = _config_options(args)
    model, tokenizer = _load(args)
    ids = _prompt_ids(args, tokenizer, model.device)
    eager_forward = model.forward  # (kept for --compare: the model without kvfx)
    _compile(model, options)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.max_new_tokens)
    clock = StepClock()
    print(f"compiling with kvfx {options} on the first call (prefill, then decode) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, **{CACHE_KWARG: cache}, stopping_criteria=[clock],
                             streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                             pad_token_id=tokenizer.eos_token_id, output_logits=args.compare,
                             return_dict_in_generate=True)
    total = time.perf_counter() - start
    rep = kvfx.report(model)  # while the cache is alive: its bytes are counted
    new = out.sequences.shape[1] - ids.shape[1]
    # The first two token times include compiling the prefill and decode graphs: speed is read after them.
    steady = clock.times[1:]
    speed = f"{(len(steady) - 1) / (steady[-1] - steady[0]):.1f} tokens/s" if len(steady) > 2 else "n/a (too few tokens)"
    print(f"\n\n{new} new tokens in {total:.1f} s including compilation; decode {speed} "
          f"(batch 1, {model.device}, {model.dtype})")
    ratio = f" ({rep.kv_bytes / rep.fp_kv_bytes:.2f}x)" if rep.fp_kv_bytes else ""
    print(f"KV bytes for {ids.shape[1] + args.max_new_tokens} slots: kvfx {rep.kv_bytes:,} vs {rep.fp_kv_bytes:,} "
          f"in the model dtype{ratio}")
    print(rep)
    if args.compare and new:
        from kvfx.quality import agreement_with_fp

        print(agreement_with_fp(eager_forward, out.sequences, ids.shape[1], out.logits))
    return 0


def cmd_report(args) -> int:
    from tqdm import tqdm
    from transformers import StaticCache

    import kvfx
    from kvfx.decode import decode_steps

    options = _config_options(args)
    model, tokenizer = _load(args)
    ids = _prompt_ids(args, tokenizer, model.device)
    _compile(model, options)
    steps = 1 if args.prefill_only else 2
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
    with tqdm(total=1, desc="compile + prefill" + ("" if args.prefill_only else " + one decode step"),
              file=sys.stderr) as bar:
        decode_steps(model, ids, steps, cache=cache)
        bar.update(1)
    print(kvfx.report(model))
    return 0


def _meta(args) -> dict:
    import platform

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    except OSError:  # no git on this machine
        commit = None
    return {"model": args.model or args.gguf or "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized)",
            "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else
            f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
            "dtype": args.dtype or "default", "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}


def _print_and_plot(payload: dict, png: pathlib.Path | None) -> None:
    from kvfx import quality_report, quality_sweep

    rows = payload["rows"]
    print(quality_report.table(rows))
    if payload.get("comparison"):
        print("\n" + quality_sweep.comparison_table(payload["comparison"]))
    if payload.get("skipped"):
        print("\n" + quality_sweep.skipped_summary(payload["skipped"]))
    if png is not None and rows:
        s = payload["settings"]
        where = (f"prefill {s['prefix']} + {s['tokens']} teacher-forced tokens of {pathlib.Path(s['text']).name}"
                 if payload["task"] == "perplexity" else
                 f"{len(s['lengths'])} lengths x {len(s['depths'])} depths")
        title = f"{payload['task']}: {payload['meta']['model']}\n{where}, {payload['meta']['machine']}"
        if quality_report.plot(rows, png, title):
            print(f"wrote {png}")


def cmd_eval(args) -> int:
    from kvfx import quality, quality_sweep

    if args.plot_only:
        payload = json.loads(args.plot_only.read_text())
        _print_and_plot(payload, args.plot_only.with_suffix(".png"))
        return 0
    from kvfx.config import KVConfig

    if args.merge and args.out is None:
        raise UsageError("kvfx eval: error: --merge needs --out (the folder of the earlier result)")
    extra = dict(args.option)
    for kv in {*args.kv, *args.policy_kv}:  # a bad format or option fails before the model loads
        KVConfig.from_options({**extra, "kv": kv})
    methods = quality_sweep.sweep_methods(args.kv, args.policy, args.budget, args.pages, args.policy_kv, extra)
    if args.no_eager:
        methods.remove(quality.EAGER)
    config = KVConfig.from_options({k: v for k, v in extra.items() if k in ("group_size", "residual")})
    bits = args.quanto_bits if args.quanto_bits is not None else ([4, 2] if args.task == "perplexity" else [])
    quanto, skipped = quality_sweep.quanto_methods(bits, config.group_size, config.residual)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
                if k not in ("run", "debug", "out", "plot_only", "option", "merge")}
    settings["option"] = extra
    if args.task == "perplexity":
        settings["text_sha256"] = hashlib.sha256(pathlib.Path(args.text).read_bytes()).hexdigest()
    path = args.out / f"quality_{args.task}.json" if args.out is not None else None
    earlier = json.loads(path.read_text()) if args.merge and path is not None and path.exists() else None
    if earlier is not None:  # before the model loads and the sweep runs
        try:
            quality_sweep.check_mergeable(earlier, args.task, settings)
        except ValueError as exc:
            raise UsageError(f"kvfx eval: error: --merge {path}: {exc}") from None
    model, tokenizer = _load(args)
    if args.task == "passkey":
        prompts = quality.passkey_prompts(tokenizer, args.lengths, args.depths, args.seed)
        external = quality_sweep.kvpress_rows(args.kvpress, prompts) if args.kvpress else []
        result = quality.evaluate_passkey(model, tokenizer, prompts, methods + quanto, prefill_chunk=args.prefill_chunk)
        rows = result.rows + external
    else:
        ids = quality.text_ids(str(args.text), tokenizer)
        result = quality.evaluate_perplexity(model, ids, args.prefix, args.tokens, methods + quanto)
        rows = result.rows
    skipped += result.skipped
    payload = {"task": args.task, "meta": _meta(args), "settings": settings, "rows": rows, "skipped": skipped}
    if earlier is not None:
        payload = quality_sweep.merge(earlier, payload)
    if args.task == "passkey" and any(r["series"].startswith("kvpress ") for r in payload["rows"]):
        payload["comparison"] = quality_sweep.kvpress_comparison(payload["rows"], payload["skipped"])
    png = None
    if path is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")
        png = path.with_suffix(".png")
    _print_and_plot(payload, png)
    return 0


def cmd_prompts(args) -> int:
    from kvfx.models import load_tokenizer
    from kvfx.quality import ANSWER_TOKENS, passkey_prompts

    prompts = passkey_prompts(load_tokenizer(args.model, args.gguf), args.lengths, args.depths, args.seed)
    args.file.parent.mkdir(parents=True, exist_ok=True)
    args.file.write_text(json.dumps({"answer_tokens": ANSWER_TOKENS, "prompts": [p.to_json() for p in prompts]}) + "\n")
    print(f"wrote {len(prompts)} passkey prompts to {args.file}")
    return 0


def _benchmark_names() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in BENCHMARKS.glob("*.py") if p.stem not in NOT_BENCHMARKS)


def _bench_out_and_script_args(out: pathlib.Path, rest: list[str]) -> tuple[pathlib.Path, list[str]]:
    """`kvfx bench NAME [--out DIR] [-- SCRIPT ARGS]`: argparse's REMAINDER takes everything after NAME,
    so kvfx's own --out is read back from the part before `--`; without `--` all of it is the script's."""
    if "--" not in rest:
        return out, rest
    cut = rest.index("--")
    own = argparse.ArgumentParser(prog="kvfx bench", add_help=False)
    own.add_argument("--out", type=pathlib.Path, default=out)
    known, unknown = own.parse_known_args(rest[:cut])
    if unknown:
        raise UsageError(f"kvfx bench: error: unrecognized arguments before --: {' '.join(unknown)} "
                         "(the script's arguments go after --)")
    return known.out, rest[cut + 1:]


def cmd_bench(args) -> int:
    names = _benchmark_names()
    if not names:
        raise UsageError(f"kvfx bench: error: no benchmarks/ folder at {BENCHMARKS} (kvfx bench runs the scripts of "
                         "a source checkout, e.g. after pip install -e .)")
    if args.name not in names:
        raise UsageError(f"kvfx bench: error: unknown benchmark {args.name!r}; valid: {', '.join(names)}")
    out, extra = _bench_out_and_script_args(args.out, args.script_args)
    script = BENCHMARKS / f"{args.name.replace('-', '_')}.py"
    command = [sys.executable, str(script), *extra, "--out", str(out)]
    print("running " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command).returncode


# -------------------------------------------------------------------------------------------- main

def cmd_export_onnx(args) -> int:
    import kvfx

    options = _config_options(args)
    model, _ = _load(args)
    caches = kvfx.export_onnx(model, args.out, options=options, max_cache_len=args.max_cache_len,
                              batch_size=args.batch_size, optimize=not args.no_optimize)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, {len(caches)} cache tensors as inputs "
          f"and outputs); run it with kvfx.lowering.ort_loop")
    return 0


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except KVConfigError as e:  # a bad kvfx option: as bad as a bad flag
        if debug:
            raise
        print(f"kvfx: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvfx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        prefix = "" if isinstance(e, KVFXError) else f"{type(e).__name__}: "
        print(f"kvfx: error: {prefix}{_first_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
