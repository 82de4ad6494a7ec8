"""Hugging Face Hub access that fails fast without a network.

The Hub libraries retry each request for tens of seconds when the network is down and
then say little about what to do. Before a stage asks the Hub for a model or a dataset,
`prepare_hub()` decides once per process whether the Hub can be reached: when
`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` is set, or a quick connection to the Hub's
host fails, the libraries are switched to their offline mode, so files already in the
local Hugging Face cache still load and anything else fails at once. The error then
carries a hint naming the fixes (`offline_hint`).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Long enough for a slow but working link to answer a TCP handshake, short enough that an
# offline user waits about as long as for `--help`.
PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class HubAccess:
    online: bool
    reason: str  # why not, when offline: "HF_HUB_OFFLINE is set", "huggingface.co:443 is unreachable ..."


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def probe(host: str, port: int, timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to host:port opens within `timeout`, else why not.

    Run in a thread because name resolution ignores socket timeouts."""
    outcome: list[str | None] = ["no answer within %.0f s" % timeout]

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome[0] = None
        except OSError as exc:
            outcome[0] = exc.strerror or type(exc).__name__

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return outcome[0]


@functools.lru_cache(maxsize=1)
def hub_access() -> HubAccess:
    """Whether the Hub can be reached, decided once per process."""
    for name in OFFLINE_VARIABLES:
        if _truthy(os.environ.get(name)):
            return HubAccess(False, f"{name} is set")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return HubAccess(True, "")  # behind a proxy the direct probe proves nothing
    host, port = _endpoint()
    failure = probe(host, port)
    if failure is None:
        return HubAccess(True, "")
    return HubAccess(False, f"{host}:{port} is unreachable ({failure})")


def _force_offline() -> None:
    """Offline mode for the Hub libraries, also when they were imported already."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    config = sys.modules.get("datasets.config")
    if config is not None:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, name):
                setattr(config, name, True)


def prepare_hub() -> HubAccess:
    """Call before asking the Hub for anything: offline, the libraries read only their cache."""
    access = hub_access()
    if not access.online:
        _force_offline()
    return access


def offline_hint(kind: str, name: str, access: HubAccess) -> str:
    """What to do when `name` (a model or a dataset) is not in the local cache and the Hub is not reachable."""
    why = f"the Hub was not reachable ({access.reason})" if not access.online else "the download failed"
    if kind == "model":
        return (f"{why}. Use local weights: [backbone] model = \"local-dir:PATH\" (a folder with open_clip_config.json "
                f"and weights) or pretrained = a checkpoint file; or fetch it once where there is a network "
                f"(`hf download REPO --local-dir PATH`, or run cscope there so it lands in the Hugging Face cache). "
                f"Gated models need `hf auth login` first. Set HF_HUB_OFFLINE=1 to skip the network check.")
    return (f"{why}. Use a local copy: [datasets.NAME] source = \"imagefolder\" or \"disk\" with path = a folder; "
            f"or fetch it once with `hf download {name} --repo-type dataset --local-dir PATH`. Gated datasets "
            f"(imagenet-1k is one) need `hf auth login` and accepting their terms on the Hub first. "
            f"Set HF_DATASETS_OFFLINE=1 to skip the network check.")
