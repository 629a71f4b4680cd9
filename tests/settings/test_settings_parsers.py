"""The settings' parsers, one kind of value at a time."""

from __future__ import annotations

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.settings import parse_bool, parse_ollama


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        (" AUTO ", "auto"),
        ("off", "off"),
        ("Off", "off"),
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("https://ollama.example.com", "https://ollama.example.com"),
        ("http://gpu-box.lan:8080/ollama", "http://gpu-box.lan:8080/ollama"),
        ("http://[::1]:11434", "http://[::1]:11434"),
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("localhost", "http://localhost"),
        ("0.0.0.0:11434", "http://0.0.0.0:11434"),
        ("ollama_host", "http://ollama_host"),
    ],
)
def test_parse_ollama(value: str, expected: str) -> None:
    assert parse_ollama(value, "GPUSHARE_OLLAMA") == expected


@pytest.mark.parametrize(
    "value", ["", "ftp://x", "http://", "http://:11434", "a b", "host:abc", "http://h:70000", "no", 5, None]
)
def test_parse_ollama_refuses(value: object) -> None:
    with pytest.raises(SettingError, match=r"^GPUSHARE_OLLAMA: "):
        parse_ollama(value, "GPUSHARE_OLLAMA")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(text, True) for text in ("1", "true", "True", "YES", "on", " On ")],
        *[(text, False) for text in ("0", "false", "FALSE", "no", "off", "Off ")],
        (True, True),
        (False, False),
    ],
)
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value, "GPUSHARE_ENFORCE") is expected


@pytest.mark.parametrize("value", ["", "y", "2", "enabled", 1, None])
def test_parse_bool_refuses(value: object) -> None:
    with pytest.raises(
        SettingError, match=r"^GPUSHARE_ENFORCE: not a flag .*: " + repr(value).replace("'", "'")
    ):
        parse_bool(value, "GPUSHARE_ENFORCE")
