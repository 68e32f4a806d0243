"""The command line's shape: help for every command, option layering, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_run import cli
from integration.trained import QUICK_SPEC

from ravenp2p.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, build_parser, command_parsers, main
from ravenp2p.node.datadir import DEFAULT_DATA_DIR

COMMANDS = ("node", "keys", "peers", "wallet", "stake", "unstake", "withdraw", "submit",
            "status", "jobs", "fetch", "cancel", "devnet")


def test_the_top_level_help_lists_every_command_with_a_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split(maxsplit=1)) == 2, f"{command} has no description"
    assert "exit codes" in out and "RAVENP2P_" in out


@pytest.mark.parametrize("command", sorted(command_parsers(build_parser())))
def test_every_command_has_help_with_a_description(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ravenp2p {command}")
    description = out.split("\n\n")[1]
    assert description[0].isupper() and description.rstrip().endswith("."), description
    assert "--config FILE" in out and "--debug" in out


def parse(argv: list[str]) -> object:
    from ravenp2p.cli import parse_arguments

    return parse_arguments(argv)


def test_options_come_from_the_command_line_then_env_then_config_section_then_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ravenp2p.toml"
    config.write_text(
        'data-dir = "/srv/top"\nshare = 5\nbootstrap = "/ip4/1.2.3.4/tcp/1/p2p/x"\n'
        '[node]\nshare = 20\ni-consent = true\nthreads = 2\n'
    )
    monkeypatch.delenv("RAVENP2P_CONFIG", raising=False)
    args = parse(["node", "--config", str(config)])
    assert (args.share, args.consent, args.threads) == (20, True, 2)  # [node] beats the top
    assert args.data_dir == Path("/srv/top") and args.bootstrap == ["/ip4/1.2.3.4/tcp/1/p2p/x"]
    monkeypatch.setenv("RAVENP2P_SHARE", "30")
    monkeypatch.setenv("RAVENP2P_I_CONSENT", "no")
    monkeypatch.setenv("RAVENP2P_BOOTSTRAP", "/ip4/1.1.1.1/tcp/1/p2p/a, /ip4/2.2.2.2/tcp/2/p2p/b")
    args = parse(["node", "--config", str(config)])
    assert (args.share, args.consent) == (30, False)  # the environment beats the file
    assert args.bootstrap == ["/ip4/1.1.1.1/tcp/1/p2p/a", "/ip4/2.2.2.2/tcp/2/p2p/b"]
    args = parse(["node", "--config", str(config), "--share", "40", "--i-consent"])
    assert (args.share, args.consent) == (40, True)  # the command line beats everything
    monkeypatch.setenv("RAVENP2P_CONFIG", str(config))
    assert parse(["jobs"]).data_dir == Path("/srv/top")  # the top level reaches every command
    monkeypatch.delenv("RAVENP2P_CONFIG")
    assert parse(["jobs"]).data_dir == DEFAULT_DATA_DIR
    monkeypatch.setenv("RAVENP2P_DATA_DIR", str(tmp_path))
    assert parse(["keys", "show"]).data_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[node]\nshare = 'lots'\n", {}, "[node] share: 'lots' is not a valid int"),
        ("[node]\nshrae = 5\n", {}, "[node] shrae: not an option of this command (did you mean "
                                    "'share'?)"),
        ("chian = 'http://x'\n", {}, "chian: no command has this option (did you mean 'chain'?)"),
        ("[node]\ni-consent = 'yes'\n", {}, "[node] i_consent: must be true or false"),
        ("[node]\ndevice = 'tpu'\n", {}, "[node] device: 'tpu' is not one of cpu, cuda"),
        ("node = 3\n", {}, "[node] must be a table"),
        ("share = [\n", {}, "is not valid TOML"),
        ("", {"RAVENP2P_SHARE": "half"}, "RAVENP2P_SHARE: 'half' is not a valid int"),
        ("", {"RAVENP2P_I_CONSENT": "maybe"}, "RAVENP2P_I_CONSENT: must be 1/true/yes"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line_that_names_it(
    text: str, env: dict[str, str], message: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = cli(capsys, "node", "--config", str(config))
    assert code == EXIT_USAGE
    assert err.startswith("ravenp2p: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_a_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--config", str(tmp_path / "none.toml"), "jobs")
    assert code == EXIT_USAGE and "none.toml: no such file" in err


@pytest.mark.parametrize("command", [["jobs"], ["status", "abc"], ["cancel", "abc"],
                                     ["fetch", "abc"], ["peers"]])
def test_no_running_node_is_exit_3_in_one_line(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, *command, "--data-dir", str(tmp_path), "--json")
    assert code == EXIT_UNREACHABLE and out == ""
    assert err.strip() == f"ravenp2p: error: no node is running with data dir {tmp_path} " \
                          f"(no {tmp_path / 'control.sock'})"


def test_an_invalid_job_spec_is_refused_before_any_node_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(QUICK_SPEC.read_text().replace('loss = "cross_entropy"', 'loss = "hinge"'))
    code, _, err = cli(capsys, "submit", str(spec), "--data-dir", str(tmp_path))
    assert code == EXIT_USAGE and "loss" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from ravenp2p.node.control import ControlError

    with pytest.raises(ControlError):
        main(["jobs", "--data-dir", str(tmp_path), "--debug"])


def test_keys_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "keys", "new", "--data-dir", str(tmp_path), "--json")
    assert code == EXIT_OK
    created = json.loads(out)
    code, out, _ = cli(capsys, "keys", "show", "--data-dir", str(tmp_path), "--json")
    assert code == EXIT_OK and json.loads(out) == created
    assert created["address"].startswith("0x") and created["peer_id"].startswith("16U")
