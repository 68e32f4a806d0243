"""Options shared by the commands, and where their values come from.

A value is taken from, in order: the command line; an environment variable
`RAVENP2P_<OPTION>` (dashes as underscores, upper case: `RAVENP2P_DATA_DIR`,
`RAVENP2P_SHARE`); the command's table of the TOML config file (`[node]`,
`[submit]`, ...); the file's top-level keys, which apply to every command that
has the option; the built-in default. The config file is `--config FILE` or
`RAVENP2P_CONFIG`. Keys are option names without the leading dashes
(`metrics-port` or `metrics_port`). Flags take booleans; repeatable options
take a list (a comma-separated list in the environment).
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ravenp2p.node.config import ConfigError
from ravenp2p.node.datadir import DEFAULT_DATA_DIR

ENV_PREFIX = "RAVENP2P_"
CONFIG_ENV = "RAVENP2P_CONFIG"
_NOT_LAYERED = {"help", "version", "config", "debug"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def common_options() -> argparse.ArgumentParser:
    """--config and --debug, for every command: accepted before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML file of option values (default $RAVENP2P_CONFIG)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    return common


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR,
        help="node directory with its key and state (default ~/.ravenp2p)",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_chain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain", metavar="URL",
                        help="JSON-RPC URL of the Ethereum node holding stakes and job escrows")
    parser.add_argument("--contracts", type=Path, metavar="FILE",
                        help="deployment file (chain id and contract addresses) for --chain")


def option_key(action: argparse.Action) -> str | None:
    """The config key of an option (its longest `--name`, dashes as underscores)."""
    names = [s for s in action.option_strings if s.startswith("--")]
    if not names:
        return None
    key = max(names, key=len)[2:].replace("-", "_")
    return None if key in _NOT_LAYERED else key


def load_config_file(path: Path) -> dict[str, Any]:
    """The parsed TOML config file; `ConfigError` naming the file when it cannot be read."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path}: cannot be read ({exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None


def layered_defaults(
    parser: argparse.ArgumentParser,
    command: str,
    config: Mapping[str, Any],
    config_name: str,
    commands: set[str],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """Defaults for `parser`'s options from the environment and the config file.

    `commands` are every command's name: a table named after one is that
    command's section; any other key must be an option of some command (it is
    checked against `parser` only when it is one of this command's).
    """
    actions = {key: a for a in parser._actions if (key := option_key(a)) is not None}
    values: dict[str, Any] = {}
    top = {k.replace("-", "_"): v for k, v in config.items() if k not in commands}
    section = config.get(command, {})
    if not isinstance(section, dict):
        raise ConfigError(f"config: {config_name}: [{command}] must be a table")
    section = {k.replace("-", "_"): v for k, v in section.items()}
    for key in section:
        if key not in actions:
            raise ConfigError(f"config: {config_name}: [{command}] {key}: "
                              f"{_unknown(key, actions)}")
    for source, table in ((f"{config_name}: {{}}", top), (f"{config_name}: [{command}] {{}}",
                                                           section)):
        for key, value in table.items():
            if key in actions:
                where = "config: " + source.format(key)
                values[actions[key].dest] = _from_toml(actions[key], value, where)
    for key, action in actions.items():
        name = ENV_PREFIX + key.upper()
        if name in environ:
            values[action.dest] = _from_env(action, environ[name], name)
    return values


def check_top_level_keys(
    config: Mapping[str, Any], config_name: str, known: set[str], commands: set[str]
) -> None:
    """Refuse a top-level key that is no option of any command (a typo, most likely)."""
    for raw in config:
        if raw in commands:
            continue
        key = raw.replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config: {config_name}: {raw}: no command has this option{hint}")


def _unknown(key: str, actions: Mapping[str, argparse.Action]) -> str:
    close = difflib.get_close_matches(key, sorted(actions), n=1)
    return "not an option of this command" + (f" (did you mean {close[0]!r}?)" if close else "")


def _from_toml(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: must be a string or a list of strings")
        return [_converted(action, item, where) for item in items]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: must be a string or a number, not {value!r}")
    return _converted(action, str(value), where)


def _from_env(action: argparse.Action, text: str, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ConfigError(f"{where}: must be 1/true/yes or 0/false/no, not {text!r}")
        return lowered in _TRUE
    if isinstance(action, argparse._AppendAction):
        return [_converted(action, item.strip(), where) for item in text.split(",") if item.strip()]
    return _converted(action, text, where)


def _converted(action: argparse.Action, text: str, where: str) -> Any:
    convert = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except (TypeError, ValueError) as exc:
        kind = getattr(convert, "__name__", "value")
        raise ConfigError(f"{where}: {text!r} is not a valid {kind} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    if isinstance(value, Path):
        value = value.expanduser()
    return value


def environment() -> Mapping[str, str]:
    """The process environment (a seam for tests)."""
    return os.environ
