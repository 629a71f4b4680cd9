"""Reserve VRAM for a local inference server (vLLM, TGI, llama.cpp...) by asking its endpoint.

The server preallocates its memory when it starts. While it is up, that memory is already
outside the GPU's free memory, so nothing more is held back; while it is down (it may start
during the run), all of it is. Either way "can this test ever run here?" is judged with the
server at full size.

Settings (environment): INFERENCE_SERVER_URL (default http://127.0.0.1:8000),
INFERENCE_SERVER_VRAM (default 16GiB), INFERENCE_SERVER_GPU (the GPU index, default 0).

Planning hooks run once per session in the xdist controller, which loads only the initial
conftests: keep this file at the rootdir (or in a plugin), not in a test subfolder.
"""

import os

import requests

from pytest_gpushare import Reservation
from pytest_gpushare.units import parse_size


def _server_up(url: str) -> bool:
    session = requests.Session()
    session.trust_env = False  # a loopback server must not be asked through HTTP_PROXY
    try:
        return session.get(f"{url}/health", timeout=(0.3, 1.0)).ok
    except requests.RequestException:
        return False
    finally:
        session.close()


def pytest_gpushare_reservations(config, gpus):
    url = os.environ.get("INFERENCE_SERVER_URL", "http://127.0.0.1:8000").rstrip("/")
    need = parse_size(os.environ.get("INFERENCE_SERVER_VRAM", "16GiB"), "INFERENCE_SERVER_VRAM")
    index = int(os.environ.get("INFERENCE_SERVER_GPU", "0"))
    if index not in {g.index for g in gpus}:
        return []
    if _server_up(url):
        return [Reservation(index, 0, "inference server (up, holds its own)", kind="server", full_bytes=need)]
    return [Reservation(index, need, "inference server (down, kept free)", kind="server", full_bytes=need)]
