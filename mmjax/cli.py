"""The `mmjax` command line: parse arguments, call library functions, map errors to exit codes.

Exit status: 0 success; 1 a check that ran and failed (e.g. `compare` over tolerance, `check`
finding the latest checkpoint unreadable);
2 bad input (one line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from mmjax.errors import MmjaxError


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


# --- commands --------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    from mmjax.convert.compare import compare

    report = compare(args.hf_dir, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                     adapter=args.adapter, download=args.download)
    if args.json:
        _print_json(report)
    else:
        print(f"model_type: {report['model_type']}")
        for name, diff in report.get("diffs", {}).items():
            print(f"  {name:<24s} max |diff| = {diff:.3e}")
        verdict = "PASSED" if report["passed"] else "FAILED"
        print(f"max_abs_diff = {report['max_abs_diff']:.3e}  tolerance = {report['tolerance']:.0e}  {verdict}")
    return 0 if report["passed"] else 1


def cmd_convert(args) -> int:
    from mmjax.convert.compare import convert_dir

    convert_dir(args.hf_dir, args.out_dir, download=args.download)
    print(f"wrote mmjax checkpoint to {args.out_dir}")
    return 0


def cmd_export(args) -> int:
    from mmjax.convert.compare import export_adapter_dir, export_dir

    if args.adapter:
        export_adapter_dir(args.ckpt_dir, args.hf_out_dir)
        print(f"wrote peft LoRA adapter to {args.hf_out_dir}")
        return 0
    part = export_dir(args.ckpt_dir, args.hf_out_dir, part=args.part)
    print(f"wrote Hugging Face checkpoint to {args.hf_out_dir}" + (f" ({part} model)" if part else ""))
    return 0


def cmd_train(args) -> int:
    from mmjax.parallel.distributed import maybe_initialize_distributed
    from mmjax.train import run

    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    metrics = run(
        args.config, workdir=args.workdir, steps=args.steps, stop_at=args.stop_at, mesh=args.mesh,
        overrides=args.set or [], json_output=args.json, force_unlock=args.force_unlock,
        phase=args.phase,
    )
    if args.json:
        _print_json(metrics)
    return 0


def cmd_check(args) -> int:
    from mmjax.train.checkpointing import check_workdir

    report = check_workdir(args.workdir)
    if args.json:
        _print_json(report)
    else:
        print(f"workdir {report['workdir']}")
        if not report["steps"]:
            print("  no checkpoints")
        for row in report["steps"]:
            state = "readable" if row["readable"] else f"UNREADABLE: {row['reason']}"
            print(f"  step {row['step']:>8}  {state}")
        if report["note"]:
            print(f"  note: {report['note']}")
        for name in report["set_aside"]:
            print(f"  set aside: checkpoints_unreadable/{name}")
        lock = report["lock"]
        if lock is None:
            print("  lock: none (no run is writing this workdir)")
        else:
            stale = f"; stale: {lock['stale']}" if lock["stale"] else ""
            print(f"  lock: held by {lock['owner']}{stale}")
    return 1 if report["latest_readable"] is False else 0


def cmd_generate(args) -> int:
    from mmjax.textgen import generate_text

    texts = generate_text(
        args.workdir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed,
        images=args.image,
    )
    if args.json:
        _print_json({"prompt": args.prompt, "completions": texts})
    else:
        for text in texts:
            print(text)
    return 0


def cmd_bench(args) -> int:
    from mmjax.bench import run

    from mmjax.train.experiment import parse_override

    overrides = dict(parse_override(item) for item in (args.set or []))
    result = run(args.name, **overrides)
    if args.json:
        _print_json(result)
    else:
        print(json.dumps(result, indent=2, default=_json_default))
    return 0


# --- parser ----------------------------------------------------------------------------------

_DOWNLOAD_HELP = ("a Hub id missing from the huggingface_hub cache is downloaded (configs, safetensors, "
                  "tokenizer files); without it nothing touches the network")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmjax", description="Multimodal large models in JAX/Flax, checked against PyTorch."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compare", help="compare a Hugging Face checkpoint with its mmjax conversion")
    p.add_argument("hf_dir", help="directory written by save_pretrained (config.json + *.safetensors), "
                   "or a Hub id org/name[@revision] from the huggingface_hub cache")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", metavar="PEFT_DIR", default=None,
                   help="a peft LoRA adapter directory (or Hub id): compare against PeftModel.from_pretrained(base, PEFT_DIR)")
    p.add_argument("--download", action="store_true", help=_DOWNLOAD_HELP)
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON report")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("convert", help="Hugging Face directory -> mmjax checkpoint (Orbax + config)")
    p.add_argument("hf_dir", help="save_pretrained directory or Hub id org/name[@revision]")
    p.add_argument("out_dir")
    p.add_argument("--download", action="store_true", help=_DOWNLOAD_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="mmjax checkpoint or training workdir -> Hugging Face directory")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_out_dir")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA training workdir: write its adapter as a peft directory "
                        "(adapter_config.json + adapter_model.safetensors) instead of the merged model")
    p.add_argument("--part", default=None,
                   help="a workdir holding several models: which one (I-JEPA: 'target', the EMA encoder "
                        "the paper evaluates, the default; or 'context')")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="run an experiment config (resumes from the workdir)")
    p.add_argument("config", help="experiment file, e.g. experiments/llm_text.py")
    p.add_argument("--workdir", default=None)
    p.add_argument("--steps", type=int, default=None, help="total steps of the run (LR schedule spans it)")
    p.add_argument("--stop-at", type=int, default=None, help="save and exit after this step")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4 (axes data,fsdp,tensor,expert,seq)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (a pipeline's phase: PHASE.KEY=VALUE)")
    p.add_argument("--phase", default=None,
                   help="a multi-phase experiment (get_pipeline()): train this phase's config alone")
    p.add_argument("--json", action="store_true", help="last stdout line is the final metrics JSON")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port (with --num-processes, "
                   "--process-id), or 'auto' to detect a TPU pod / SLURM / MPI cluster; "
                   "see docs/scale_out.md")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--force-unlock", action="store_true",
                   help="take the workdir's lock even when its owner looks alive (only when you "
                        "know that run is gone, e.g. on a machine that is down)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="verify a training workdir: which checkpoint steps are "
                                     "readable, which run holds its lock (reads only)")
    p.add_argument("workdir")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON report")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="sample text from a trained or converted model")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", action="append", default=None,
                   help="an image file for a vision-language model, one per <image> in the "
                        "prompt (repeat for several)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks against a reference run in the same process")
    p.add_argument("name", help="decode, train, attention, clip, ...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a benchmark argument, e.g. --set batch_sizes=[1] --set new_tokens=16")
    p.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def _version() -> str:
    from mmjax import __version__

    return f"mmjax {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    func: Callable[[Any], int] = args.func
    try:
        return func(args)
    except MmjaxError as e:
        print(f"mmjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"mmjax {args.command}: error: no such file or directory: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmjax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
