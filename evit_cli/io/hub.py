"""Reaching the Hugging Face hub: a quick reachability probe, offline mode when it does not answer,
an export's folder from its repository, and the push of an exported folder."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from ..errors import EvitError, first_line

META_FILE = "evit.json"  # what marks a repository or folder as an evit export


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


def from_hub(repo_id: str) -> Path | None:
    """The local snapshot of the hub repository ``repo_id`` when it holds an evit export (its
    ``evit.json``), downloaded or, when the hub does not answer within seconds, from the cache
    (``HF_HUB_CACHE``); ``None`` when no such export can be had."""
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = go_offline_if_unreachable()
    try:
        hf_hub_download(repo_id, META_FILE, local_files_only=offline)
    except Exception:  # noqa: BLE001 - no such repo, no evit.json, not cached: not an export we can read
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as e:  # noqa: BLE001
        raise EvitError(f"cannot get the files of {repo_id} from the Hugging Face hub ({first_line(e)}): "
                        "retry, or download the repository and give its folder") from None


def locate(spec: str) -> Path:
    """The folder of an export: ``spec`` itself, or the snapshot of the hub repository ``org/name``."""
    path = Path(spec)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return path
    folder = from_hub(spec)
    if folder is not None:
        return folder
    if go_offline_if_unreachable():
        raise EvitError(f"{spec} is not a folder here, and no evit export {spec} is in the local Hugging Face cache "
                        "(the hub cannot be reached): give the exported folder")
    raise EvitError(f"{spec} is neither a folder here nor a hub repository holding an evit export ({META_FILE})")


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face hub; returns the repo URL."""
    from huggingface_hub import HfApi

    if not hub_reachable():
        raise EvitError(
            f"cannot push to {repo_id}: the Hugging Face hub cannot be reached. The export in {folder} is "
            f"complete; upload it later with `hf upload {repo_id} {folder}`"
        )
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload EViT model (evit)")
    except Exception as e:  # noqa: BLE001 - auth, permissions, network: all one message
        raise EvitError(
            f"pushing {folder} to {repo_id} failed ({first_line(e)}); the local export is complete: "
            "log in with `hf auth login` and retry"
        ) from None
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"

