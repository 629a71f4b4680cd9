"""The docs cannot rot: they build without warnings, and every command they show is run.

Shell examples in ``docs/**/*.rst`` are ``.. code-block:: console`` blocks. A line starting with
``$ `` is a command (a trailing ``\\`` continues it); the lines after it, up to the next command,
are output it must print, in order (``...`` matches any text, a line of only ``...`` stands for
lines left out). Each page runs in a fresh folder, top to bottom: a code block whose caption is
a file name (``:caption: test_models.py``) is written there first, so commands see the files the
page shows. Commands must exit 0; a page that shows a failure ends the command with
``; echo "exit code $?"`` and shows that line. Commands that need a real GPU or a server go in
``.. code-block:: bash`` blocks without prompts and are not run.

Every command runs with ``GPUSHARE_LEDGER_DIR`` in its folder, ``GPUSHARE_OLLAMA=off`` (a command
may set it), no inherited ``GPUSHARE_*``/``PYTEST_*``/``OLLAMA_*``/``CUDA_*`` variables, and
``PYTEST_XDIST_AUTO_NUM_WORKERS=8`` so that "xdist's own count" is the same on every machine
(the docs say their output comes from an 8-CPU box). An rst comment before a block,
``.. docs-test: ollama NAME=SIZE[/VRAM][,NAME=SIZE...]``, serves that block from a stand-in
Ollama (tests/ollama_server.py) at ``OLLAMA_HOST``, with those models loaded (``VRAM``: the part
on the GPU, default all of it); ``ollama none`` serves no model, and ``ollama down`` is a port
that refuses connections. Its address prints as ``127.0.0.1:11434``.
``.. docs-test: health-server VAR`` serves ``GET /health`` with 200 at the URL in ``$VAR``
(printed as ``127.0.0.1:8000``), a stand-in for an inference server.
``.. docs-test: before`` marks a file of a suite as it was before its migration (the adopting
page): the page's commands see it until a later block replaces it, and the suite made of these
files alone must end the same with and without the plugin.

Output that needs a real GPU is shown in ``text`` blocks; ``.. docs-test: observed RUN`` before
one checks its lines (same rules as console output) against a run of a small suite on a stand-in
NVML (tests/fake_pynvml.py) where each test really "uses" memory in NVML's per-process list:
``RUN`` is ``summary`` (``pytest -n 2``), ``plan`` (``gpushare plan`` after it, with the worker
mem learned from that run) or ``unmeasured`` (the same suite where NVML lists PIDs of another
PID namespace). ``.. docs-test: oom`` checks the out-of-memory note of ``--gpushare-enforce``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from process_support import BIN, clean_env, run_command

from pytest_gpushare.settings import OPTION_NAMES
from pytest_gpushare.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)

#: Languages of code blocks that are shown but never run.
SHOWN_ONLY = {"bash", "python", "ini", "toml", "yaml", "json", "text", "cfg", "pycon"}
#: ``gpushare`` subcommands and the module each needs: a command of one not built yet is skipped.
SUBCOMMAND_MODULES = {"status": "pytest_gpushare.commands.status", "run": "pytest_gpushare.commands.run"}
DIRECTIVE_RE = re.compile(
    r"^(?P<indent>\s*)\.\. (?P<kind>code-block|literalinclude|code|sourcecode)::\s*(?P<arg>.*)$"
)
OPTION_RE = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")
DOCS_TEST_RE = re.compile(r"^\s*\.\. docs-test:\s*(?P<what>[\w-]+)(?:\s+(?P<arg>.*))?$")
FILE_NAME_RE = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


@dataclass
class Block:
    page: Path
    line: int
    kind: str
    language: str
    caption: str | None
    body: str
    setup: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The code blocks of one rst page, in order, with their body dedented."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    setup: dict[str, str] = {}
    i = 0
    while i < len(lines):
        comment = DOCS_TEST_RE.match(lines[i])
        if comment:
            setup[comment["what"]] = (comment["arg"] or "").strip()
            i += 1
            continue
        match = DIRECTIVE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i + 1
        indent = len(match["indent"])
        options: dict[str, str] = {}
        i += 1
        while i < len(lines) and OPTION_RE.match(lines[i]):
            option = OPTION_RE.match(lines[i])
            assert option is not None
            options[option["name"]] = option["value"]
            i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        text = "\n".join(body)
        width = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        text = "\n".join(x[width:] for x in body).strip("\n")
        kind = match["kind"]
        if kind == "literalinclude":
            included = (page.parent / match["arg"].strip()).resolve()
            language = options.get("language", "text")
            text = included.read_text(encoding="utf-8")
        else:
            language = match["arg"].strip() or "text"
        blocks.append(Block(page, start, kind, language, options.get("caption"), text, setup))
        setup = {}
    return blocks


@dataclass
class Command:
    text: str
    expected: list[str]
    line: int


def parse_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    lines = block.body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            raise AssertionError(f"{block.where}: console output before any '$ ' command: {line!r}")
        parts = [line[2:]]
        first = i
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        i += 1
        expected: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        commands.append(Command("\n".join(parts), expected, block.line + first))
    return commands


def line_pattern(expected: str) -> re.Pattern[str]:
    pieces = [re.escape(p) for p in re.split(r"\.\.\.|…", expected.rstrip())]
    return re.compile(".*".join(pieces))


def match_output(expected: list[str], output: str) -> str | None:
    """None when every expected line matches an output line, in order; else what is missing."""
    actual = [x.rstrip() for x in output.splitlines()]
    pos = 0
    for want in expected:
        if not want.strip() or want.strip() in ("...", "…"):
            continue
        pattern = line_pattern(want)
        while pos < len(actual) and not pattern.fullmatch(actual[pos]):
            pos += 1
        if pos == len(actual):
            return want
        pos += 1
    return None


def base_env(folder: Path) -> dict[str, str]:
    return clean_env(
        GPUSHARE_LEDGER_DIR=str(folder / ".ledger"),
        GPUSHARE_OLLAMA="off",
        PYTEST_XDIST_AUTO_NUM_WORKERS="8",
        COLUMNS="100",
        PYTHONDONTWRITEBYTECODE="1",
    )


@contextmanager
def stand_ins(block: Block, env: dict[str, str]) -> Iterator[tuple[list[tuple[str, str]], dict[str, str]]]:
    """Servers a block asks for; yields (real text, text the docs show) pairs and the environment."""
    with ExitStack() as stack:
        replace: list[tuple[str, str]] = []
        if "ollama" in block.setup:
            sys.path.insert(0, str(ROOT / "tests"))
            try:
                from ollama_server import FakeOllama, ps_model, refused_port
            finally:
                sys.path.remove(str(ROOT / "tests"))
            what = block.setup["ollama"]
            if what == "down":
                port = stack.enter_context(refused_port())
            else:
                server = stack.enter_context(FakeOllama(models=_ollama_models(what, block.where, ps_model)))
                port = server.port
            env = env | {"OLLAMA_HOST": f"http://127.0.0.1:{port}"}
            env.pop("GPUSHARE_OLLAMA")
            replace.append((f"127.0.0.1:{port}", "127.0.0.1:11434"))
        if "health-server" in block.setup:
            port = stack.enter_context(health_server())
            env = env | {block.setup["health-server"]: f"http://127.0.0.1:{port}"}
            replace.append((f"127.0.0.1:{port}", "127.0.0.1:8000"))
        yield replace, env


def _ollama_models(spec: str, where: str, ps_model: Any) -> list[dict[str, Any]]:
    """``NAME=SIZE[/VRAM],...`` (or ``none``) as ``/api/ps`` entries."""
    if spec == "none":
        return []
    models = []
    for item in spec.split(","):
        name, _, sizes = item.strip().rpartition("=")
        size, _, vram = sizes.partition("/")
        models.append(ps_model(name, parse_size(size, where), parse_size(vram, where) if vram else None))
    return models


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def health_server() -> Iterator[int]:
    """A stand-in inference server on 127.0.0.1 that answers ``GET /health``; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def pending(command: str) -> str | None:
    for sub, module in SUBCOMMAND_MODULES.items():
        if re.search(rf"\bgpushare {sub}\b", command) and importlib.util.find_spec(module) is None:
            return f"`gpushare {sub}` is not built yet ({module})"
    return None


def run_page(page: Path, folder: Path) -> list[str]:
    """Run a page's commands in ``folder``; returns the commands skipped as not built yet."""
    skipped: list[str] = []
    for block in parse_blocks(page):
        if block.caption and FILE_NAME_RE.match(block.caption) and block.language != "console":
            target = folder / block.caption
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body + "\n", encoding="utf-8")
            continue
        if block.language != "console":
            continue
        for command in parse_commands(block):
            why = pending(command.text)
            if why:
                skipped.append(f"{block.page.name}:{command.line}: {why}")
                continue
            with stand_ins(block, base_env(folder)) as (replace, env):
                proc = run_command(
                    ["bash", "-c", command.text],
                    cwd=folder,
                    env=env,
                    timeout=180,
                )
            output = proc.stdout
            for real, shown in replace:
                output = output.replace(real, shown)
            where = f"{page.relative_to(ROOT)}:{command.line}: $ {command.text}"
            assert proc.returncode == 0, f"{where}\nexit code {proc.returncode}\n{output}"
            missing = match_output(command.expected, output)
            assert missing is None, f"{where}\nno output line matches {missing!r}; the output was:\n{output}"
    return skipped


# --- the shape of the docs ------------------------------------------------------------------


def test_pages_found() -> None:
    assert DOCS / "index.rst" in PAGES
    assert len(PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_are_marked(page: Path) -> None:
    """Console blocks hold commands; shown-only blocks hold none; no other shell languages."""
    for block in parse_blocks(page):
        assert block.language == "console" or block.language in SHOWN_ONLY, (
            f"{block.where}: code-block language {block.language!r}: use console (run by the tests) or "
            f"one of {sorted(SHOWN_ONLY)}"
        )
        if block.language == "console":
            assert parse_commands(block), f"{block.where}: a console block without a '$ ' command"
        elif block.language == "bash":
            prompts = [x for x in block.body.splitlines() if x.startswith("$ ")]
            assert not prompts, f"{block.where}: a bash block is not run; use console for {prompts[0]!r}"


def test_parser_reads_commands_and_output() -> None:
    block = Block(ROOT, 1, "code-block", "console", None, "$ echo a \\\n  b\na b\n$ true")
    commands = parse_commands(block)
    assert [c.text for c in commands] == ["echo a \\\n  b", "true"]
    assert commands[0].expected == ["a b"]
    assert match_output(["x ... z", "...", "[100%]"], "x y z\nother\n[100%]") is None
    assert match_output(["[100%]", "x y z"], "x y z\n[100%]") == "x y z"


NAME_RES = {
    "flag": re.compile(r"--gpushare-[a-z-]*[a-z]"),
    "ini": re.compile(r"\bgpushare_[a-z_]*[a-z]\b"),
    "env": re.compile(r"\bGPUSHARE_[A-Z_]*[A-Z]\b"),
}
KNOWN = {
    "flag": {o.flag for o in OPTION_NAMES},
    "ini": {o.name for o in OPTION_NAMES} | {"gpushare_docs"},
    "env": {o.env for o in OPTION_NAMES} | {"GPUSHARE_LEASED_GPUS"},
}


def _doc_and_example_files() -> list[Path]:
    files = [*PAGES, ROOT / "README.md"]
    files += [p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files


def test_every_setting_named_exists() -> None:
    """A flag, ini name or environment variable in the docs or examples is a real setting."""
    unknown = []
    for path in _doc_and_example_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for kind, pattern in NAME_RES.items():
            unknown += [
                f"{path.relative_to(ROOT)}: {m}" for m in pattern.findall(text) if m not in KNOWN[kind]
            ]
    assert not unknown, "names that are no setting:\n" + "\n".join(sorted(set(unknown)))


#: ``pip install pytest-gpushare`` (from PyPI), not ``pytest-gpushare @ git+...`` or a path.
PYPI_INSTALL_RE = re.compile(r"pip install(?: -[-\w]+)*(?: [-.\w\[\]]+)*? pytest-gpushare(?![-\w]| @)")


def test_install_commands_work_before_the_release() -> None:
    """While the changelog calls this version unreleased, nothing tells a reader to install it from
    PyPI, where it is not."""
    from pytest_gpushare import __version__

    changelog = (DOCS / "changelog.rst").read_text(encoding="utf-8")
    if f"{__version__} (unreleased)" not in changelog:
        pytest.skip(f"{__version__} is released")
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in _doc_and_example_files()
        for m in PYPI_INSTALL_RE.finditer(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, "installs from PyPI before the first release:\n" + "\n".join(found)


# --- the commands ---------------------------------------------------------------------------

RUNNABLE = [p for p in PAGES if any(b.language == "console" for b in parse_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_commands(page: Path, tmp_path: Path) -> None:
    skipped = run_page(page, tmp_path)
    if skipped:
        pytest.skip("; ".join(skipped))


# --- the build ------------------------------------------------------------------------------


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed (pip install sphinx, or tox -e docs)")
    proc = run_command(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    settings_page = (tmp_path / "html" / "reference" / "settings.html").read_text(encoding="utf-8")
    for option in OPTION_NAMES:
        assert option.flag in settings_page and option.env in settings_page


# --- the timeline picture -------------------------------------------------------------------


def _shape(svg: str) -> list[tuple[str, tuple[str, ...], str]]:
    """Element tags, attribute names and texts in document order: the picture's structure."""
    root = ET.fromstring(svg)
    return [(el.tag, tuple(sorted(el.attrib)), (el.text or "").strip()) for el in root.iter()]


def test_timeline_picture_matches_its_report(tmp_path: Path) -> None:
    """docs/_static/timeline.svg is what `gpushare timeline` draws from the committed report."""
    out = tmp_path / "timeline.svg"
    proc = run_command(
        [str(BIN / "gpushare"), "timeline", str(DOCS / "_static" / "demo-report.json"), "-o", str(out)],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout
    committed = (DOCS / "_static" / "timeline.svg").read_text(encoding="utf-8")
    assert _shape(out.read_text(encoding="utf-8")) == _shape(committed), (
        "docs/_static/timeline.svg is out of date: gpushare timeline docs/_static/demo-report.json "
        "-o docs/_static/timeline.svg"
    )


# --- the report schema ----------------------------------------------------------------------


def _keys(value: Any, path: str = "") -> set[str]:
    """Every key of a JSON document, as dotted paths with ``[]`` for list items and ``{}`` for maps
    keyed by data (GPU uuids)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            name = "{}" if key.startswith(("GPU-", "MIG-")) else key
            here = f"{path}.{name}" if path else name
            found.add(here)
            found |= _keys(item, here)
    elif isinstance(value, list):
        for item in value:
            found |= _keys(item, f"{path}[]")
    return found


def test_report_schema_is_documented(tmp_path: Path) -> None:
    """Every key a real --gpushare-report holds is a documented ``literal`` on the report page."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu(mem='2GiB')\ndef test_a(gpu):\n    pass\n\n"
        "@pytest.mark.gpu(mem='40GiB')\ndef test_never(gpu):\n    pass\n"
    )
    env = base_env(tmp_path)
    proc = run_command(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--gpushare-simulate=24GiB:used=2GiB",
            "--gpushare-ollama-reserve=12GiB",
            "--gpushare-report=report.json",
        ],
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    import json

    document = json.loads((tmp_path / "report.json").read_text())
    page = (DOCS / "reference" / "report.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"``([^`]+)``", page))
    # plan.gpus[].gpu is the object documented once as plan.inventory.gpus[].
    keys = {k.replace("plan.gpus[].gpu.", "plan.inventory.gpus[].") for k in _keys(document)}
    missing = sorted(k for k in keys if k not in documented)
    assert not missing, f"keys of the JSON report not documented in docs/reference/report.rst: {missing}"
    assert document["version"] == 1 and "``version``" in page


def test_gpu_lease_fields_are_documented() -> None:
    import dataclasses

    from pytest_gpushare import GpuLease

    page = (DOCS / "reference" / "marker.rst").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(GpuLease) if f"``{f.name}``" not in page]
    assert not missing, f"GpuLease fields not documented in docs/reference/marker.rst: {missing}"


# --- suites that never asked (docs/howto/adopting.rst) ---------------------------------------

ADOPTING = DOCS / "howto" / "adopting.rst"


def _files_before(page: Path) -> dict[str, str]:
    """The files a page shows under ``.. docs-test: before``: the suites before their migration."""
    return {b.caption: b.body for b in parse_blocks(page) if "before" in b.setup and b.caption}


def _outcomes(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """The exit code of a run, and each test's outcome (from its JUnit XML)."""
    proc = _pytest([*args, "-W", "error", "--strict-config", "--junitxml=junit.xml"], cwd, env)
    outcomes = {}
    for case in ET.parse(cwd / "junit.xml").getroot().iter("testcase"):
        found = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = found[0] if found else "passed"
    return proc.returncode, outcomes


@pytest.mark.parametrize(
    "suite, args",
    [
        ("arrays", []),
        ("ransac", []),
        ("shade", []),
        ("shade", ["--gpu"]),
    ],
)
def test_suites_before_migration_mean_the_same_with_the_plugin(
    suite: str, args: list[str], tmp_path: Path
) -> None:
    """On a box without a GPU, the page's suites as they were before their migration (their own
    ``gpu`` marker, ``device`` fixture, ``--gpu`` option) end as they do without the plugin."""
    for name, text in _files_before(ADOPTING).items():
        if name.startswith(f"{suite}/"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text + "\n", encoding="utf-8")
    env = base_env(tmp_path) | {"GPUSHARE_SIMULATE": "none"}
    without = _outcomes([suite, *args, "-p", "no:gpushare"], tmp_path, env)
    with_plugin = _outcomes([suite, *args], tmp_path, env)
    assert without[1], "the suite ran no test"
    assert with_plugin == without


# --- the examples ---------------------------------------------------------------------------


def _pytest(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env)


def test_example_multigpu(tmp_path: Path) -> None:
    proc = _pytest(["examples/multigpu", "-n", "2", "--gpushare-simulate=2x24GiB"], ROOT, base_env(tmp_path))
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"\b6 passed\b", proc.stdout), proc.stdout


def test_example_pytorch(tmp_path: Path) -> None:
    """The PyTorch examples pass where torch is installed, and are skipped (not broken) elsewhere."""
    proc = _pytest(["examples/pytorch", "-n", "2", "--gpushare-simulate=24GiB"], ROOT, base_env(tmp_path))
    if importlib.util.find_spec("torch") is not None:
        assert proc.returncode == 0, proc.stdout
        assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout
    else:
        # Every module skips itself at import: pytest exits 5 (no tests ran) and says why.
        assert proc.returncode == 5, proc.stdout
        assert "could not import 'torch'" in proc.stdout, proc.stdout


def test_example_ollama(tmp_path: Path) -> None:
    """examples/ollama/pytest.ini keeps 12GiB for Ollama and credits what it already holds."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from ollama_server import FakeOllama, ps_model
    finally:
        sys.path.remove(str(ROOT / "tests"))
    with FakeOllama(models=[ps_model("qwen2.5:14b", int(10.8 * 2**30))]) as server:
        env = base_env(tmp_path) | {"OLLAMA_HOST": server.url}
        del env["GPUSHARE_OLLAMA"]
        proc = _pytest(["-n", "2", "--gpushare-simulate=24GiB:used=12.8GiB"], EXAMPLES / "ollama", env)
    assert proc.returncode == 0, proc.stdout
    assert "Ollama hold 1.2GiB, safety 1.0GiB -> usable 9.0GiB" in proc.stdout, proc.stdout
    assert "holds 10.8GiB already -> hold back 1.2GiB more" in proc.stdout, proc.stdout
    assert re.search(r"\b5 passed\b", proc.stdout), proc.stdout


# --- output that needs a GPU: checked against a stand-in NVML ---------------------------------

#: A box of one RTX 4090 whose processes "use" what they say (tests/usage_box.py).
OBSERVED_CONFTEST = """
import sys
sys.path.insert(0, {tests!r})
from usage_box import GiB, install, peak

install("GPU-0f0f0f0f-1111-2222-3333-444455556666", used=2 * GiB)
"""
OBSERVED_SUITE = {
    "tests/test_train.py": (
        "import pytest\nfrom conftest import GiB, peak\n\n\n"
        '@pytest.mark.gpu(mem="4GiB")\ndef test_epoch(gpu):\n    peak(12 * GiB)\n\n\n'
        '@pytest.mark.gpu(mem="2GiB")\ndef test_step(gpu):\n    peak(GiB + GiB // 2)\n'
    ),
    "tests/test_eval.py": (
        'import pytest\nfrom conftest import GiB, peak\n\n\n@pytest.mark.gpu(mem="8GiB")\n'
        "def test_metrics(gpu):\n    peak(GiB)\n"
    ),
}


def _observed_runs(folder: Path) -> dict[str, str]:
    """The output of each run that ``.. docs-test: observed RUN`` blocks are checked against."""
    (folder / "conftest.py").write_text(OBSERVED_CONFTEST.format(tests=str(ROOT / "tests")))
    for name, text in OBSERVED_SUITE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    usage = folder / "usage"
    usage.mkdir()
    env = base_env(folder) | {"USAGE_DIR": str(usage)}

    def run(args: list[str], extra: dict[str, str] | None = None) -> str:
        proc = run_command(
            [sys.executable, *args],
            cwd=folder,
            env=env | (extra or {}),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout
        for entry in usage.iterdir():  # exited processes leave NVML's list
            entry.unlink()
        return proc.stdout

    runs = {"summary": run(["-m", "pytest", "-n", "2"])}
    runs["plan"] = run(["-m", "pytest_gpushare", "plan"])
    runs["unmeasured"] = run(
        ["-m", "pytest", "-n", "2", "-p", "no:cacheprovider"], {"PID_OFFSET": str(2**22)}
    )
    return runs


def _observed_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_blocks(page) if "observed" in b.setup]


def test_gpu_output_shown_is_what_the_plugin_prints(tmp_path: Path) -> None:
    """Text blocks marked ``.. docs-test: observed RUN`` match a real run on a stand-in NVML."""
    blocks = _observed_blocks()
    assert blocks, "no page has a '.. docs-test: observed' block any more"
    runs = _observed_runs(tmp_path)
    for block in blocks:
        which = block.setup["observed"]
        assert which in runs, f"{block.where}: docs-test: observed {which!r}: use one of {sorted(runs)}"
        # A "$ command" line says what ran; the output is what is checked.
        expected = [x for x in block.body.splitlines() if not x.startswith("$ ")]
        missing = match_output(expected, runs[which])
        assert missing is None, (
            f"{block.where}\nno output line matches {missing!r}; the output of {which!r} was:\n{runs[which]}"
        )


def test_oom_note_shown_is_what_the_plugin_prints() -> None:
    """The ``--gpushare-enforce`` note on the lying-tests page is annotate_oom's, for torch's own text."""
    from pytest_gpushare.enforce import annotate_oom

    blocks = [b for page in PAGES for b in parse_blocks(page) if "oom" in b.setup]
    assert blocks
    # PyTorch's message for a test that leased 4GiB (capped at 4.5GiB with its 512MiB of cache)
    # and asked for 8GiB more.
    torch_error = (
        "CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacity of 23.53 GiB of "
        "which 14.61 GiB is free. 4.50 GiB allowed; Including non-PyTorch memory, this process has "
        "4.79 GiB memory in use. Of the allocated memory 4.00 GiB is allocated by PyTorch, and "
        "512.00 MiB is reserved by PyTorch but unallocated."
    )
    note = annotate_oom(RuntimeError(torch_error), 4 * 2**30)
    assert note is not None
    for block in blocks:
        assert match_output(block.body.splitlines(), note) is None, (
            f"{block.where}: the plugin prints\n{note}"
        )
