import dataclasses
from pathlib import Path

import pytest

from tiermesh.kit.config import ConfigError, describe, load, setting


@dataclasses.dataclass(frozen=True)
class Example:
    port: int = setting("PORT", help="a port", min=1, max=65535)
    ratio: float = setting("RATIO", 0.5, help="a ratio", min=0, max=1)
    mode: str = setting("MODE", "fast", help="a mode", choices=("fast", "slow"))
    verbose: bool = setting("VERBOSE", False, help="chatty")
    path: Path | None = setting("PATH", None, help="a file")


def test_reads_and_converts_every_type():
    config = load(
        Example,
        prefix="X_",
        environ={"X_PORT": "80", "X_RATIO": "0.25", "X_MODE": "slow", "X_VERBOSE": "yes", "X_PATH": "/tmp/a"},
    )
    assert config == Example(port=80, ratio=0.25, mode="slow", verbose=True, path=Path("/tmp/a"))


def test_defaults_apply_when_unset_or_empty():
    config = load(Example, prefix="X_", environ={"X_PORT": "1", "X_MODE": ""})
    assert (config.ratio, config.mode, config.verbose, config.path) == (0.5, "fast", False, None)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "X_PORT: required but not set"),
        ({"X_PORT": "eighty"}, "X_PORT: expected an integer, got 'eighty'"),
        ({"X_PORT": "0"}, "X_PORT: must be >= 1"),
        ({"X_PORT": "70000"}, "X_PORT: must be <= 65535"),
        ({"X_PORT": "1", "X_RATIO": "lots"}, "X_RATIO: expected a number"),
        ({"X_PORT": "1", "X_MODE": "medium"}, "X_MODE: expected one of fast, slow, got 'medium'"),
        ({"X_PORT": "1", "X_VERBOSE": "maybe"}, "X_VERBOSE: expected a boolean"),
    ],
)
def test_bad_values_name_the_variable(environ, message):
    with pytest.raises(ConfigError) as raised:
        load(Example, prefix="X_", environ=environ)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_describe_lists_every_variable():
    rows = describe(Example, prefix="X_")
    assert [name for name, _, _ in rows] == ["X_PORT", "X_RATIO", "X_MODE", "X_VERBOSE", "X_PATH"]
    assert rows[0][1] == "(required)"
    meanings = {name: meaning for name, _, meaning in rows}
    assert meanings["X_MODE"] == "a mode (one of fast, slow)"
    assert meanings["X_PORT"] == "a port (1 to 65535)" and meanings["X_VERBOSE"] == "chatty"
