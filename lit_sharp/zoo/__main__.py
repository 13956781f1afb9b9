"""``python -m lit_sharp.zoo``: fetch a zoo's public files, or list its models.

``download ZOO --to DIR [--only N]`` fetches the zoo's metadata and model files into DIR (rerun it to resume);
``list ZOO --root DIR [--downloaded] [--comma]`` prints the zoo's model names, one per line (``--comma``: on one line,
comma-separated, the form of a grid's ``zoo.model=...,...`` override). A user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lit_sharp.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lit_sharp.zoo``."""
    from lit_sharp.zoo.sources import DOWNLOADABLE, ZOOS

    parser = argparse.ArgumentParser(prog="python -m lit_sharp.zoo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="fetch a zoo's files into a folder (resumable)")
    download.add_argument("zoo", choices=DOWNLOADABLE)
    download.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder for the files (created)")
    download.add_argument("--only", type=_positive, metavar="N", help="fetch only the first N models, for a trial")
    download.add_argument("--retries", type=int, default=3, help="resumes of a stopped transfer (default: 3)")
    listing = commands.add_parser("list", help="print a zoo's model names")
    listing.add_argument("zoo", choices=[zoo for zoo in ZOOS if zoo != "timm"])
    listing.add_argument("--root", type=Path, required=True, metavar="DIR", help="folder of the zoo's files")
    listing.add_argument("--downloaded", action="store_true", help="only the models whose file is in DIR")
    listing.add_argument("--comma", action="store_true",
                         help="one comma-separated line, for a grid: python train.py -m ... zoo.model=$(...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user error prints ``error: ...`` on stderr and returns 2."""
    from lit_sharp.zoo.download import download_zoo
    from lit_sharp.zoo.sources import list_zoo, zoo_source

    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            paths = download_zoo(zoo_source(args.zoo), args.to, only=args.only, retries=args.retries)
            print(f"{args.zoo}: {len(paths)} files in {args.to}")
        else:
            names = list_zoo(args.zoo, args.root, downloaded_only=args.downloaded)
            print(("," if args.comma else "\n").join(names))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
