"""`python -m flashode [demo] [options]`: the demo (see `flashode.demo`); `python -m flashode config`
prints what runs where."""

from __future__ import annotations

import argparse

from . import demo
from ._config import show_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flashode", description="flashode: neural ODE solvers for PyTorch")
    commands = parser.add_subparsers(dest="command")
    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    commands.add_parser("config", help="print the torch versions and which path (kernel or reference) each op takes")
    args = parser.parse_args(argv)
    if args.command == "config":
        show_config()
    else:
        if args.command is None:  # bare `python -m flashode` runs the demo with its defaults
            args = parser.parse_args(["demo", *(argv or [])])
        demo.run(args)


if __name__ == "__main__":
    main()
