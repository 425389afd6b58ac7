"""`mesh generate`: single-process generation — the single-device fallback and the
reference the pipeline is checked against."""

from __future__ import annotations

import argparse
import json
import sys

from mesh import models
from mesh.commands import add_sampling_arguments
from mesh.errors import BadRequest, MeshError
from mesh.generation import GenerationParams


class ModelLoadFailed(MeshError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on this device alone (no cluster)",
                       description="Load the whole model in this process and stream the answer to stdout.")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name, .gguf path or HF directory")
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch", help="compute backend (default torch)")
    p.add_argument("--weight-mode", choices=["float32", "quant"], default="float32",
                   help="float32 weights, or the faster quantized mode")
    p.add_argument("--memory", metavar="SIZE",
                   help="refuse to run unless the model, with the KV cache of this one answer, fits in SIZE "
                        "(e.g. 512MiB); says how many MiB are missing")
    add_sampling_arguments(p, max_tokens=128, top_k=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kernels.config import load_config
    from kernels.generate import GenerationStats, generate
    from kernels.loader import load_stage
    from kernels.stage import StageSpec
    from kernels.tokenizer import IncrementalDetokenizer, Tokenizer
    from kernels.tokenizer.chat_template import ChatTemplateError, ChatTemplateMissing

    path = models.resolve(args.model, fetch=True, progress=sys.stderr.isatty())
    try:
        config = load_config(path)
        tokenizer = Tokenizer.from_model(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadFailed(f"cannot read the model at {path}: {exc}") from None
    if not args.prompt.strip():
        raise BadRequest("the prompt is empty")
    if args.raw:
        prompt_ids = tokenizer.encode_prompt(args.prompt)
    else:
        try:
            prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        except (ChatTemplateMissing, ChatTemplateError) as exc:
            raise BadRequest(str(exc)) from None
    params = GenerationParams.create(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, seed=args.seed)
    params.validate(prompt_len=len(prompt_ids), context_length=config.context_length)
    if args.memory is not None:
        _check_memory(args, config, context=len(prompt_ids) + params.max_tokens)
    try:
        stage = load_stage(path, StageSpec.full(config.n_layers), backend=args.backend, weight_mode=args.weight_mode)
    except (ValueError, OSError) as exc:
        raise ModelLoadFailed(f"cannot load the model at {path}: {exc}") from None
    stats = GenerationStats()
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    token_ids, pieces = [], []
    for token in generate(stage, prompt_ids, max_tokens=params.max_tokens, sampling=params.sampling,
                          stop_ids=tokenizer.eos_token_ids, stats=stats):
        token_ids.append(token)
        piece = detok.feed(token)
        pieces.append(piece)
        if not args.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    rest = detok.flush()
    pieces.append(rest)
    if args.json:
        print(json.dumps({
            "text": "".join(pieces), "token_ids": token_ids, "prompt_token_ids": prompt_ids,
            "finish_reason": stats.finish_reason, "ttft_s": stats.ttft_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "backend": args.backend,
            "weight_mode": args.weight_mode,
        }))
    else:
        sys.stdout.write(rest + "\n")
    return 0


def _check_memory(args: argparse.Namespace, config, *, context: int) -> None:
    """--memory: this one session's model and KV cache must fit, on a machine that has it."""
    import psutil

    from mesh import sizing

    try:
        budget = sizing.memory_bytes(args.memory)
    except ValueError as exc:
        raise BadRequest(f"--memory: {exc}") from None
    profile = sizing.model_profile(config, args.weight_mode, kv_sessions=1, kv_context=context)
    sizing.check_budget(budget, profile, psutil.virtual_memory().total)
    sizing.check_fits(budget, profile, args.model, args.weight_mode)
