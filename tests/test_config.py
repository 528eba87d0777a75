"""relay.config: settings from RELAY_* variables and overrides, the limits, the docs table."""

from __future__ import annotations

import dataclasses

import pytest

from relay import config
from relay.config import ENV_PREFIX, Settings, table_markdown


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.max_frame_bytes, settings.max_msgs_per_s) == (
        "127.0.0.1", 8000, 16384, 120.0,
    )


def test_every_setting_has_a_default_a_type_and_a_doc() -> None:
    for f in config.fields():
        assert f.default is not dataclasses.MISSING, f.name
        assert type(f.default) in (int, float, str), f.name
        assert f.metadata["doc"].strip(), f.name


def test_environment_values_are_parsed_to_each_setting_type() -> None:
    settings = Settings.from_env(
        {
            "RELAY_HOST": "0.0.0.0",
            "RELAY_PORT": "9001",
            "RELAY_MAX_MSGS_PER_S": "2.5",
            "RELAY_ERRORS_WINDOW_S": "3",
            "RELAY_BURST": " 7 ",
            "RELAY_REDIS": "redis://localhost:6379/0",
            "RELAY_SECRET": "",
        }
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9001 and type(settings.port) is int
    assert settings.max_msgs_per_s == 2.5 and type(settings.max_msgs_per_s) is float
    assert settings.errors_window_s == 3.0 and type(settings.errors_window_s) is float
    assert settings.burst == 7
    assert settings.redis == "redis://localhost:6379/0"
    assert settings.secret == ""


def test_every_setting_is_read_from_its_variable() -> None:
    env = {}
    expected = {}
    for f in config.fields():
        value = {int: 3, float: 0.25, str: "x"}[type(f.default)]
        env[ENV_PREFIX + f.name.upper()] = str(value)
        expected[f.name] = value
    assert dataclasses.asdict(Settings.from_env(env)) == expected


def test_other_variables_are_ignored() -> None:
    env = {"PORT": "1", "relay_port": "2", "RELAY_NOT_A_SETTING": "3", "RELAYPORT": "4"}
    settings = Settings.from_env(env)
    assert settings == Settings()


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_MAX_FRAME_BYTES", "1234")
    monkeypatch.setenv("RELAY_LOG_LEVEL", "debug")
    settings = Settings.from_env()
    assert (settings.max_frame_bytes, settings.log_level) == (1234, "debug")


def test_overrides_beat_the_environment() -> None:
    env = {"RELAY_PORT": "9001", "RELAY_HOST": "0.0.0.0", "RELAY_BURST": "9"}
    settings = Settings.from_env(env, port=7000, max_errors=4)
    assert (settings.port, settings.max_errors) == (7000, 4)
    assert (settings.host, settings.burst) == ("0.0.0.0", 9)  # not overridden: from env


def test_none_overrides_are_ignored() -> None:
    # the command line passes None for every flag it was not given
    settings = Settings.from_env({"RELAY_PORT": "9001"}, port=None, host=None)
    assert (settings.port, settings.host) == (9001, "127.0.0.1")


def test_overrides_of_falsy_values_still_count() -> None:
    settings = Settings.from_env({"RELAY_FLUSH_MS": "5", "RELAY_REDIS": "redis://x"}, flush_ms=0.0, redis="")
    assert (settings.flush_ms, settings.redis) == (0.0, "")


@pytest.mark.parametrize(
    "variable, raw",
    [
        ("RELAY_PORT", "abc"),
        ("RELAY_PORT", "80.5"),
        ("RELAY_PORT", ""),
        ("RELAY_BURST", "1e3"),
        ("RELAY_MAX_MSGS_PER_S", "fast"),
        ("RELAY_FLUSH_MS", ""),
        ("RELAY_OUTBOX_HARD_BYTES", "256k"),
    ],
)
def test_bad_values_raise_value_error_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        Settings.from_env({variable: raw})
    assert variable in str(caught.value)
    assert repr(raw) in str(caught.value)


@pytest.mark.parametrize("close_timeout_s, max_close_wait_s", [(0, 30), (5, 4)])
def test_close_waits_must_make_sense(close_timeout_s: float, max_close_wait_s: float) -> None:
    with pytest.raises(ValueError, match="close_timeout_s"):
        Settings(close_timeout_s=close_timeout_s, max_close_wait_s=max_close_wait_s)


def test_settings_are_frozen_and_keyword_only() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings("0.0.0.0")  # type: ignore[misc]


def test_to_env_round_trips() -> None:
    settings = Settings(port=9, max_msgs_per_s=33.5, redis="redis://r", secret="s3", flush_ms=2.0)
    env = settings.to_env()
    assert set(env) == {ENV_PREFIX + f.name.upper() for f in config.fields()}
    assert env["RELAY_PORT"] == "9"
    assert Settings.from_env(env) == settings


def test_limits_told_to_clients() -> None:
    settings = Settings(max_frame_bytes=1000, max_msgs_per_s=5.0, burst=9, max_message_bytes=500)
    limits = settings.limits()
    assert limits["max_frame_bytes"] == 1000
    assert limits["max_msgs_per_s"] == 5.0
    assert limits["max_message_bytes"] == 500
    assert limits["burst"] == 9
    assert all(name in {f.name for f in config.fields()} for name in limits)
    assert all(type(v) in (int, float) for v in limits.values())


def test_table_markdown_lists_every_setting() -> None:
    lines = table_markdown().splitlines()
    assert lines[0] == "| setting | environment | default | meaning |"
    assert lines[1] == "| --- | --- | --- | --- |"
    rows = lines[2:]
    assert len(rows) == len(config.fields())
    for row, f in zip(rows, config.fields()):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4, row
        flag, env, default, doc = cells
        assert flag == f"`--{f.name.replace('_', '-')}`"
        assert env == f"`RELAY_{f.name.upper()}`"
        assert default == ("`(none)`" if f.default == "" else f"`{f.default}`")
        assert doc == f.metadata["doc"]


def test_table_markdown_examples() -> None:
    table = table_markdown()
    assert "| `--max-frame-bytes` | `RELAY_MAX_FRAME_BYTES` | `16384` |" in table
    assert "| `--redis` | `RELAY_REDIS` | `(none)` |" in table
