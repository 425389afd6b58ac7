"""One module per `python -m mesh` subcommand; each exports `register(subparsers)`.

`register` adds its parser and sets `func=handler`; a handler takes the parsed
arguments and returns an exit code. Errors derived from `MeshError` are printed as
one line by the CLI, never as a traceback.
"""

COMMAND_MODULES = [
    "mesh.commands.generate",
    "mesh.commands.join",
    "mesh.commands.demo",
    "mesh.commands.models",
    "mesh.commands.secret",
    "mesh.commands.run",
    "mesh.commands.status",
    "mesh.commands.admit",
]


def add_sampling_arguments(p, *, max_tokens: int = 128, top_k: bool = False) -> None:
    """The sampling flags every generating command shares."""
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    if top_k:
        p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling randomness (default 0)")
