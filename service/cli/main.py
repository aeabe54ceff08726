"""`sd-endpoint`: one console script, one sub-command per job.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported lazily so that, say, the HTTP client does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.hosts.server", "run the HTTP scoring server"),
    "batch": ("service.batch.command", "score folders of prompt files (local, az://, s3://)"),
    "generate": ("service.cli.client", "send a prompt to a running endpoint and save the images"),
    "jobs": ("service.cli.jobs", "list, wait for, fetch, cancel and delete the jobs of a running endpoint"),
    "make-model": ("service.cli.make_model", "write a random-weight model as a diffusers folder"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen sub-command's module is imported (to add its arguments)."""
    parser = argparse.ArgumentParser(prog="sd-endpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    args = build_parser(command).parse_args(arguments)
    code: int = args._module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
