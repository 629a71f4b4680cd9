"""Asking Ollama what it holds: against a real HTTP server on 127.0.0.1 that plays Ollama."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest
from ollama_server import FakeOllama, ps_model, refused_port, silent_listener

from pytest_gpushare.ollama import OllamaModel, OllamaStatus, query_ollama
from pytest_gpushare.report import spilling_lines
from pytest_gpushare.units import GiB, TiB

# A correctness bound (SPEC: "at most about one second"), not a benchmark.
BOUND = 1.5
# Which of the two deadlines fires first (the socket's or the caller's) depends on scheduling.
NO_ANSWER = re.compile(r"no (complete )?answer within 1s")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def server() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


def no_pids() -> tuple[int, ...]:
    return ()


def ask(server: FakeOllama, find_pids: Callable[[], tuple[int, ...]] = no_pids) -> OllamaStatus:
    return query_ollama(server.url, {}, find_pids=find_pids)


def timed(setting: str, env: dict[str, str] | None = None) -> tuple[OllamaStatus, float]:
    start = time.monotonic()
    status = query_ollama(setting, env or {}, find_pids=no_pids)
    return status, time.monotonic() - start


# --- a good answer -------------------------------------------------------------------------


def test_loaded_models_are_read_with_their_sizes(server: FakeOllama) -> None:
    server.models = [ps_model("mistral:latest", 5137025024), ps_model("qwen3:14b", 10 * GiB, 8 * GiB)]
    status = ask(server)
    assert (status.address, status.asked, status.answered, status.problem) == (server.url, True, True, None)
    assert status.models == (
        OllamaModel("mistral:latest", 5137025024, 5137025024),
        OllamaModel("qwen3:14b", 10 * GiB, 8 * GiB),
    )
    assert status.held_bytes() == 5137025024 + 8 * GiB
    assert spilling_lines(status) == [
        "WARNING: Ollama model qwen3:14b is spilling to the CPU: 2.0GiB of 10.0GiB is not on the GPU"
    ]
    assert server.requests == ["/api/ps"]


def test_nothing_loaded_is_a_valid_answer(server: FakeOllama) -> None:
    status = ask(server)
    assert (status.answered, status.models, status.problem, status.held_bytes()) == (True, (), None, 0)
    server.mode, server.body = "body", b'{"models": null}'  # a Go nil slice
    status = ask(server)
    assert (status.answered, status.models, status.held_bytes()) == (True, (), 0)


def test_answers_without_newer_fields_are_fine(server: FakeOllama) -> None:
    old = ps_model("llama2", 4 * GiB)
    del old["context_length"], old["details"], old["digest"], old["expires_at"], old["model"]
    server.models = [old]
    assert ask(server).models == (OllamaModel("llama2", 4 * GiB, 4 * GiB),)


def test_a_model_without_size_vram_is_all_on_the_cpu(server: FakeOllama) -> None:
    # Older Ollama omitted size_vram when it was 0 (ollama/ollama#4840).
    entry = ps_model("llama3:70b", 40 * GiB)
    del entry["size_vram"]
    server.models = [entry]
    status = ask(server)
    assert status.answered
    assert status.held_bytes() == 0
    assert spilling_lines(status) == [
        "WARNING: Ollama model llama3:70b is spilling to the CPU: 40.0GiB of 40.0GiB is not on the GPU"
    ]


def test_the_name_falls_back_to_model_and_is_made_one_printable_line(server: FakeOllama) -> None:
    nameless = ps_model("x", GiB)
    del nameless["name"]
    nameless["model"] = "phi3:mini"
    server.models = [nameless, ps_model("evil\n\x1b[31mred\tname", GiB)]
    names = [m.name for m in ask(server).models]
    assert names == ["phi3:mini", "evil [31mred name"]


def test_ollama_pids_are_looked_for_only_when_models_hold_vram(server: FakeOllama) -> None:
    calls: list[int] = []

    def pids() -> tuple[int, ...]:
        calls.append(1)
        return (41, 42)

    assert ask(server, find_pids=pids).pids == ()
    assert calls == []
    server.models = [ps_model("m", GiB)]
    assert ask(server, find_pids=pids).pids == (41, 42)
    assert calls == [1]


def test_auto_asks_the_server_named_by_ollama_host_in_os_environ(
    server: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.models = [ps_model("m", GiB)]
    monkeypatch.setenv("OLLAMA_HOST", f"0.0.0.0:{server.port}")
    status = query_ollama("auto", find_pids=no_pids)
    assert status.address == f"http://127.0.0.1:{server.port}"
    assert status.held_bytes() == GiB


def test_a_path_in_the_address_prefixes_the_api(server: FakeOllama) -> None:
    status = query_ollama(f"{server.url}/ollama/", {})
    assert server.requests == ["/ollama/api/ps"]
    assert status.problem == "HTTP 404 Not Found"


def test_the_fake_answers_the_other_documented_endpoints(server: FakeOllama) -> None:
    import requests

    server.models = [ps_model("m", GiB)]
    assert requests.get(f"{server.url}/api/version", timeout=5).json() == {"version": "0.12.6"}
    tags = requests.get(f"{server.url}/api/tags", timeout=5).json()["models"]
    assert tags[0]["name"] == "m" and "size_vram" not in tags[0] and "modified_at" in tags[0]
    assert requests.get(server.url, timeout=5).text == "Ollama is running"


# --- off never connects --------------------------------------------------------------------


def test_off_makes_no_connection(server: FakeOllama) -> None:
    env = {"OLLAMA_HOST": f"127.0.0.1:{server.port}"}
    status = query_ollama("off", env)
    assert status == OllamaStatus("off", asked=False, answered=False, models=(), problem=None)
    assert server.connections == 0
    # the control: the same environment with auto does connect
    assert query_ollama("auto", env).answered
    assert server.connections == 1


# --- untrusted answers: every doubt means nothing is credited ------------------------------


def _ps(*models: object) -> bytes:
    return json.dumps({"models": list(models)}).encode()


def _with(**fields: object) -> dict[str, object]:
    entry = ps_model("x", 8 * GiB)
    entry.update(fields)
    return entry


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>It works!</html>", "the answer is not JSON"),
        (b"", "the answer is not JSON"),
        (b"\xff\xfe\x00garbage", "the answer is not JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "the answer is not JSON"),  # too deep for the parser
        (b'[{"name": "x"}]', "the answer is not a JSON object"),
        (b'"models"', "the answer is not a JSON object"),
        (b"{}", "the answer has no 'models' field"),
        (b'{"models": {"name": "x"}}', "field 'models' is not a list"),
        (b'{"models": "none"}', "field 'models' is not a list"),
        (_ps("x"), "model #1 is not a JSON object"),
        (_ps(ps_model("ok", GiB), None), "model #2 is not a JSON object"),
        (_ps(_with(name=None, model=None)), "model #1 has no name"),
        (_ps(_with(name="  ")), "model #1 has no name"),
        (_ps(_with(name=7, model=7)), "model #1 has no name"),
        (_ps(_with(size="8589934592")), "field 'size' of model 'x' is not a whole number: \"8589934592\""),
        (_ps(_with(size_vram="8GB")), "field 'size_vram' of model 'x' is not a whole number: \"8GB\""),
        (_ps(_with(size_vram=1.5e9)), "field 'size_vram' of model 'x' is not a whole number: 1500000000.0"),
        (_ps(_with(size=True)), "field 'size' of model 'x' is not a whole number: true"),
        (_ps(_with(size_vram=[1])), "field 'size_vram' of model 'x' is not a whole number: [1]"),
        (_ps(_with(size_vram={})), "field 'size_vram' of model 'x' is not a whole number: {}"),
        (
            b'{"models": [{"name": "x", "size": 10, "size_vram": NaN}]}',
            "field 'size_vram' of model 'x' is not a whole number: NaN",
        ),
        (
            b'{"models": [{"name": "x", "size": Infinity, "size_vram": 1}]}',
            "field 'size' of model 'x' is not a whole number: Infinity",
        ),
        (_ps(_with(size=None)), "field 'size' of model 'x' is missing"),
        (_ps({"name": "x", "size_vram": 1}), "field 'size' of model 'x' is missing"),
        (_ps(_with(size=-1)), "field 'size' of model 'x' is negative: -1"),
        (_ps(_with(size_vram=-5)), "field 'size_vram' of model 'x' is negative: -5"),
        (_ps(_with(size=2**60, size_vram=1)), "field 'size' of model 'x' is absurd (more than 16.0TiB)"),
        (_ps(_with(size_vram=2**64)), "field 'size_vram' of model 'x' is absurd (more than 16.0TiB)"),
        # too large for a float, so it must not be formatted as a size
        (_ps(_with(size=10**4000)), "field 'size' of model 'x' is absurd (more than 16.0TiB)"),
        (
            _ps(_with(size=GiB, size_vram=2 * GiB)),
            "model 'x' claims more VRAM (2.0GiB) than its size (1.0GiB)",
        ),
        (
            _ps(*(ps_model(f"m{i}", 2 * TiB) for i in range(9))),
            "the models claim more than 16.0TiB of VRAM in all",
        ),
    ],
)
def test_an_untrustworthy_answer_is_not_used(server: FakeOllama, body: bytes, problem: str) -> None:
    server.mode, server.body = "body", body
    status = ask(server)
    assert (status.asked, status.answered, status.models, status.held_bytes()) == (True, False, (), 0)
    assert status.problem is not None
    assert status.problem.startswith(problem)
    assert "\n" not in status.problem
    assert spilling_lines(status) == []


def test_a_number_with_thousands_of_digits_is_not_used(server: FakeOllama) -> None:
    # Python >= 3.10.7 refuses to parse it at all; older ones parse it and find it absurd.
    server.mode, server.body = "body", b'{"models": [{"name": "x", "size": 1' + b"0" * 5000 + b"}]}"
    status = ask(server)
    assert (status.answered, status.held_bytes()) == (False, 0)
    assert status.problem in (
        "the answer is not JSON",
        "field 'size' of model 'x' is absurd (more than 16.0TiB)",
    )


def test_one_bad_model_spoils_the_whole_answer(server: FakeOllama) -> None:
    server.models = [ps_model("good", 5 * GiB), _with(name="bad", size_vram="lots")]
    status = ask(server)
    assert (status.answered, status.models, status.held_bytes()) == (False, (), 0)
    assert status.problem == "field 'size_vram' of model 'bad' is not a whole number: \"lots\""


def test_a_problem_quotes_untrusted_text_on_one_short_line(server: FakeOllama) -> None:
    server.mode, server.body = "body", _ps(_with(name="a\nb" + "z" * 500, size="x\ny"))
    problem = ask(server).problem
    assert problem is not None
    assert "\n" not in problem
    assert problem.startswith("field 'size' of model 'a bzzz")
    assert len(problem) < 200


@pytest.mark.parametrize(
    ("status_code", "problem"),
    [(500, "HTTP 500 Internal Server Error"), (404, "HTTP 404 Not Found"), (204, "HTTP 204 No Content")],
)
def test_an_http_error_is_a_problem(server: FakeOllama, status_code: int, problem: str) -> None:
    server.mode, server.status = "status", status_code
    status = ask(server)
    assert (status.answered, status.problem, status.held_bytes()) == (False, problem, 0)


def test_a_compressed_answer_is_refused(server: FakeOllama) -> None:
    server.mode, server.models = "gzip", [ps_model("m", GiB)]
    status = ask(server)
    assert (status.answered, status.problem) == (False, "compressed answer refused (Content-Encoding: gzip)")


def test_a_redirect_is_not_followed(server: FakeOllama) -> None:
    with FakeOllama(models=[ps_model("elsewhere", 20 * GiB)]) as other:
        server.mode, server.redirect_to = "redirect", f"{other.url}/api/ps"
        status = ask(server)
        assert status.answered is False
        assert status.problem == f"redirected to {other.url}/api/ps (HTTP 307; not followed)"
        assert other.connections == 0


# --- dead, slow and huge servers cost about a second at most -------------------------------


def test_connection_refused_is_quick() -> None:
    with refused_port() as port:
        status, elapsed = timed(f"http://127.0.0.1:{port}")
    assert (status.asked, status.answered, status.problem) == (True, False, "connection refused")
    assert elapsed < BOUND


def test_a_server_that_accepts_and_never_answers(server: FakeOllama) -> None:
    server.mode = "hang"
    status, elapsed = timed(server.url)
    assert status.answered is False
    assert status.problem is not None and NO_ANSWER.fullmatch(status.problem)
    assert elapsed < BOUND
    assert server.connections == 1


def test_a_listener_that_never_reads() -> None:
    with silent_listener() as port:
        status, elapsed = timed(f"http://127.0.0.1:{port}")
    assert status.answered is False
    assert status.problem is not None and NO_ANSWER.fullmatch(status.problem)
    assert elapsed < BOUND


@pytest.mark.parametrize(
    "mode",
    [
        "stall_body",  # a body that stalls after the headers
        # Headers that trickle forever: each line comes well within any socket timeout, so only
        # the overall deadline helps.
        "trickle_headers",
    ],
)
def test_a_server_that_stalls_is_cut_off_at_the_deadline(server: FakeOllama, mode: str) -> None:
    server.mode = mode
    status, elapsed = timed(server.url)
    assert status.answered is False
    assert status.problem is not None and NO_ANSWER.fullmatch(status.problem)
    assert elapsed < BOUND


def test_a_huge_body_is_not_read_whole(server: FakeOllama) -> None:
    server.mode = "huge"
    status, elapsed = timed(server.url)
    assert (status.answered, status.problem) == (False, "answer too large (more than 1.0MiB)")
    assert elapsed < BOUND
    assert server.huge_sent < server.huge_bytes


def test_an_absurd_declared_length_is_refused() -> None:
    with FakeOllama() as liar:
        liar.mode = "huge"
        liar.declare_length = True
        liar.huge_bytes = 10**40
        liar.chunk_delay = 0.2
        status = ask(liar)
    assert status.problem == "answer too large (absurd length, limit 1.0MiB)"


def test_a_huge_declared_length_is_refused_before_reading(server: FakeOllama) -> None:
    server.mode, server.declare_length, server.chunk_delay = "huge", True, 0.2
    status, elapsed = timed(server.url)
    assert (status.answered, status.problem) == (False, "answer too large (64.0MiB, limit 1.0MiB)")
    assert elapsed < 0.9  # it did not wait for the slow body


def test_a_slowly_streamed_body_is_cut_at_the_deadline(server: FakeOllama) -> None:
    server.mode, server.chunk_delay = "huge", 0.3
    status, elapsed = timed(server.url)
    assert status.answered is False
    assert status.problem is not None and NO_ANSWER.fullmatch(status.problem)
    assert elapsed < BOUND


def test_a_slow_name_lookup_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Socket timeouts do not cover getaddrinfo; the caller's own deadline does.
    release = threading.Event()

    def slow_getaddrinfo(*args: object, **kwargs: object) -> NoReturn:
        release.wait(10)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for var in (*PROXY_VARS, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    try:
        status, elapsed = timed("auto", {"OLLAMA_HOST": "ollama.example"})
    finally:
        release.set()
    assert status.answered is False
    assert status.problem is not None and NO_ANSWER.fullmatch(status.problem)
    assert elapsed < BOUND


def test_a_failing_pid_lookup_only_loses_the_pids(server: FakeOllama) -> None:
    def broken() -> tuple[int, ...]:
        raise PermissionError("no /proc here")

    server.models = [ps_model("m", GiB)]
    status = ask(server, find_pids=broken)
    assert (status.answered, status.held_bytes(), status.pids) == (True, GiB, ())


def test_a_shorter_timeout_is_honoured(server: FakeOllama) -> None:
    server.mode = "hang"
    start = time.monotonic()
    status = query_ollama(server.url, {}, timeout=0.3)
    assert status.problem is not None and re.fullmatch(r"no (complete )?answer within 0.3s", status.problem)
    assert time.monotonic() - start < 0.8


# --- proxies --------------------------------------------------------------------------------


def test_loopback_ignores_proxy_variables(server: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    server.models = [ps_model("m", 3 * GiB)]
    with refused_port() as dead:
        for var in PROXY_VARS:
            monkeypatch.setenv(var, f"http://127.0.0.1:{dead}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        for address in (server.url, f"http://localhost:{server.port}"):
            status = query_ollama(address, {}, find_pids=no_pids)
            assert (status.answered, status.held_bytes()) == (True, 3 * GiB), address
        via_host = query_ollama("auto", {"OLLAMA_HOST": f"0.0.0.0:{server.port}"}, find_pids=no_pids)
        assert via_host.answered


def test_other_hosts_go_through_the_proxy_as_requests_does(
    server: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake doubles as the proxy: it receives the absolute URL, so no network is needed.
    server.models = [ps_model("m", GiB)]
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    status = query_ollama("auto", {"OLLAMA_HOST": "ollama.invalid"}, find_pids=no_pids)
    assert status.address == "http://ollama.invalid:11434"
    assert (status.answered, status.held_bytes()) == (True, GiB)
    assert server.requests == ["http://ollama.invalid:11434/api/ps"]


# --- the status travels to xdist workers ---------------------------------------------------


def test_status_round_trips_through_json() -> None:
    status = OllamaStatus(
        "http://127.0.0.1:11434", True, True, (OllamaModel("a", 5, 3), OllamaModel("b", 7, 7)), None, (9, 12)
    )
    again = OllamaStatus.from_dict(json.loads(json.dumps(status.to_dict())))
    assert again == status
    failed = OllamaStatus("off", False, False, (), "why")
    assert OllamaStatus.from_dict(json.loads(json.dumps(failed.to_dict()))) == failed


def test_held_bytes_of_an_unused_answer_is_zero() -> None:
    # Models are never kept with answered=False, but held_bytes must not trust them anyway.
    status = OllamaStatus("u", True, False, (OllamaModel("a", 5, 3),), "doubt")
    assert status.held_bytes() == 0
    assert spilling_lines(status) == []
