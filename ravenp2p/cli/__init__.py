"""The `ravenp2p` command line.

Every command prints for people by default and one JSON document with
`--json`; an error is one line on stderr (`ravenp2p: error: ...`), with the
traceback only under `--debug`. Options also come from `RAVENP2P_*`
environment variables and a TOML config file (`--config`): see
`ravenp2p.cli.options`. Exit codes: see `ravenp2p.cli.status`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ravenp2p import __version__
from ravenp2p.cli import devnet, jobs, models, node, sim, wallet
from ravenp2p.cli.options import (
    CONFIG_ENV,
    check_top_level_keys,
    common_options,
    environment,
    layered_defaults,
    load_config_file,
    option_key,
)
from ravenp2p.cli.status import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "build_parser", "main"]

_EPILOG = """\
options also come from RAVENP2P_<OPTION> environment variables and a TOML
config file (--config FILE or RAVENP2P_CONFIG); the command line wins.
exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration,
3 no running node on --data-dir could be reached.
"""


class _Commands:
    """The subparsers action, handing every command the common options."""

    def __init__(self, action: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self._action = action
        self._common = common_options()

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [self._common])
        return self._action.add_parser(name, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ravenp2p",
        description="Decentralized deep-learning training on contributors' spare compute.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ravenp2p {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE", default=None,
                        help="TOML file of option values (default $RAVENP2P_CONFIG)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    node.register(commands)
    wallet.register(commands)
    jobs.register(commands)
    models.register(commands)
    devnet.register(commands)
    sim.register(commands)
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's name -> its parser (a command with actions: the actions' parsers too)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                for inner, leaf in command_parsers(sub).items():
                    found[f"{name} {inner}"] = leaf
    return found


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line, filling unset options from the environment and config file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = environment()
    config_path = args.config or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    parsers = command_parsers(parser)
    action = getattr(args, f"{args.command}_command", None)  # `keys new`: the action's parser
    leaf = parsers[f"{args.command} {action}" if action else args.command]
    config = load_config_file(config_path) if config_path is not None else {}
    name = str(config_path) if config_path is not None else ""
    tops = set(parsers) - {n for n in parsers if " " in n}
    if config:
        known = {k for p in parsers.values() for a in p._actions if (k := option_key(a))}
        check_top_level_keys(config, name, known, tops)
    defaults = layered_defaults(leaf, args.command, config, name, tops, env)
    if not defaults:
        return args
    leaf.set_defaults(**defaults)
    return parser.parse_args(argv)


def _single_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _debug_requested(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ravenp2p` console script."""
    from ravenp2p.chain.base import ChainError
    from ravenp2p.identity import IdentityError
    from ravenp2p.node.config import ConfigError
    from ravenp2p.node.control import ControlError
    from ravenp2p.node.datadir import DataDirBusy

    # Idle OpenMP threads spin by default, stealing cores from the calculations of
    # other processes; must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = _debug_requested(argv)
    try:
        args = parse_arguments(argv)
    except ConfigError as exc:
        if debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failures: tuple[type[BaseException], ...] = (IdentityError, DataDirBusy, OSError, ChainError)
    failures += jobs.FAILURES + models.FAILURES
    if args.command == "devnet":  # imports torch: only where it is needed
        from ravenp2p.devnet import DevnetError

        failures += (DevnetError,)
    try:
        try:
            code: int = args.run(args)
            return code
        except BaseExceptionGroup as group:
            # A failure inside a trio nursery arrives wrapped; report the one cause.
            cause = _single_cause(group)
            if cause is group:
                raise
            raise cause from group
    except KeyboardInterrupt:
        return EXIT_FAILED
    except (ConfigError, ValueError) as exc:
        if debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        if debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except failures as exc:
        if debug:
            raise
        print(f"ravenp2p: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if debug:
            raise
        logging.getLogger("ravenp2p").debug("unexpected error", exc_info=True)
        print(f"ravenp2p: error: {type(exc).__name__}: {exc} (use --debug for details)",
              file=sys.stderr)
        return EXIT_FAILED
