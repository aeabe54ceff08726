"""`sd-endpoint make-model`: write a random-weight model as a diffusers folder."""

from __future__ import annotations

import argparse
import logging
import sys

from model.types import ARCHITECTURES  # light: no torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=ARCHITECTURES, default="tiny", help="architecture (default: tiny)")
    parser.add_argument("--out", required=True, help="folder to write (must not already hold a model)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed; random:<arch>:<seed> gives the same model"
    )


def run(args: argparse.Namespace) -> int:
    from model.errors import ModelLoadError
    from model.export import save_random_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        folder = save_random_model(args.arch, args.out, args.seed)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote random-weight {args.arch} model (seed {args.seed}) to {folder}; its images are noise")
    return 0
