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
]
