"""Reaching the Hugging Face hub: a quick reachability probe, and offline mode when it does not answer."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


def go_offline_if_unreachable() -> bool:
    """Switch huggingface-hub to its offline mode (cache only) when the hub cannot be reached.

    Without this, a download on a machine with no network retries for about a
    minute before failing. Returns True when offline.
    """
    from huggingface_hub import constants

    if not hub_reachable():
        constants.HF_HUB_OFFLINE = True
        return True
    return False
