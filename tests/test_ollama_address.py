"""Where to ask Ollama: ``--gpushare-ollama`` and ``OLLAMA_HOST`` as Ollama's envconfig.Host() reads it."""

from __future__ import annotations

import pytest

from pytest_gpushare.errors import SettingError
from pytest_gpushare.ollama import DEFAULT_ADDRESS, query_ollama, resolve_address

# --- where to ask: OLLAMA_HOST as Ollama's envconfig.Host() reads it ----------------------


@pytest.mark.parametrize(
    ("ollama_host", "expected"),
    [
        ("", "http://127.0.0.1:11434"),
        ("   ", "http://127.0.0.1:11434"),
        # Go's Var() trims spaces and quotes
        ('"127.0.0.1:8080"', "http://127.0.0.1:8080"),
        ("'example.com'", "http://example.com:11434"),
        # no scheme: http and Ollama's port
        ("example.com", "http://example.com:11434"),
        ("example.com:1234", "http://example.com:1234"),
        ("10.0.0.5", "http://10.0.0.5:11434"),
        # an explicit scheme brings the URL's own default port
        ("http://h:5", "http://h:5"),
        ("http://h", "http://h:80"),
        ("https://h", "https://h:443"),
        ("https://h:8443", "https://h:8443"),
        # wildcards a server binds to mean loopback for a client; so does an empty host
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:1234", "http://127.0.0.1:1234"),
        (":1234", "http://127.0.0.1:1234"),
        ("::", "http://[::1]:11434"),
        ("[::]:9", "http://[::1]:9"),
        ("http://0.0.0.0:11434", "http://127.0.0.1:11434"),
        # IPv6 with or without brackets
        ("[::1]:9", "http://[::1]:9"),
        ("[::1]", "http://[::1]:11434"),
        ("::1", "http://[::1]:11434"),
        # an invalid port falls back to the default (Go logs a warning and does the same)
        ("h:abc", "http://h:11434"),
        ("h:99999", "http://h:11434"),
        ("h:-1", "http://h:11434"),
        ("h:", "http://h:11434"),
        ("https://h:x", "https://h:443"),
        # a path after the host is kept (a reverse proxy under a prefix); trailing / dropped
        ("http://h:5/ollama", "http://h:5/ollama"),
        ("h:5/ollama/", "http://h:5/ollama"),
        ("127.0.0.1:11434/", "http://127.0.0.1:11434"),
        # newer Ollama: plain ollama.com is its cloud
        ("ollama.com", "https://ollama.com:443"),
    ],
)
def test_auto_reads_ollama_host_like_ollama(ollama_host: str, expected: str) -> None:
    assert resolve_address("auto", {"OLLAMA_HOST": ollama_host}) == expected


def test_auto_without_ollama_host_is_the_default_address() -> None:
    assert resolve_address("auto", {}) == DEFAULT_ADDRESS == "http://127.0.0.1:11434"
    assert resolve_address(" AUTO ", {}) == DEFAULT_ADDRESS


@pytest.mark.parametrize("off", ["off", "OFF", " Off "])
def test_off_has_no_address(off: str) -> None:
    assert resolve_address(off, {"OLLAMA_HOST": "example.com"}) is None


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://localhost:11434/", "http://localhost:11434"),
        ("https://ollama.internal", "https://ollama.internal:443"),
        ("http://gpu-box", "http://gpu-box:80"),
        ("HTTP://Box:5/Prefix", "http://box:5/Prefix"),
        ("http://0.0.0.0:9", "http://127.0.0.1:9"),
        ("http://[::1]:9", "http://[::1]:9"),
    ],
)
def test_an_explicit_url_is_used_as_given(setting: str, expected: str) -> None:
    assert resolve_address(setting, {"OLLAMA_HOST": "elsewhere:1"}) == expected


@pytest.mark.parametrize(
    "setting",
    ["localhost:11434", "ftp://h", "http://", "http://h:99999", "http://h/?x=1", "http://u:p@h", "yes"],
)
def test_a_bad_explicit_url_is_a_setting_error_naming_its_source(setting: str) -> None:
    with pytest.raises(SettingError, match=r"^GPUSHARE_OLLAMA: .*") as info:
        resolve_address(setting, {}, source="GPUSHARE_OLLAMA")
    assert repr(setting) in str(info.value)
    assert "\n" not in str(info.value)


def test_query_never_raises_on_a_bad_setting_or_an_unusable_ollama_host() -> None:
    bad = query_ollama("localhost:11434", {})
    assert (bad.asked, bad.answered, bad.models) == (False, False, ())
    assert bad.problem is not None and "expected auto, off" in bad.problem
    ftp = query_ollama("auto", {"OLLAMA_HOST": "ftp://h"})
    assert (ftp.asked, ftp.answered) == (True, False)
    assert ftp.problem == "unsupported scheme 'ftp' in OLLAMA_HOST"
