"""What `--model` names, checked in a second before anything loads: the permanent errors.

A model that does not exist, a hub that cannot be reached, an architecture this code does not
implement: retrying changes none of them, so `pagemesh up` and `pagemesh executor` check the
spec first and stop with one line that says what to do (ModelSpecError), instead of loading
torch, starting services and retrying. Nothing here imports torch.

A hub id whose files are already in the local Hugging Face cache needs no network; otherwise the
hub is asked for the model's metadata once, with a short timeout. A hub answering 5xx is
transient: the spec passes, and the download (resolve.py) is retried by its supervisor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# HF architectures the model code implements, by `model_type` (config.py reads them from here).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
HUB_TIMEOUT_S = 5.0


class ModelSpecError(ValueError):
    """A permanent problem with the model spec; the message is one line ending in what to do."""


class ModelNotFound(ModelSpecError, FileNotFoundError):
    """The spec names no model that exists (a path, a file, a hub id)."""


class UnsupportedModel(ModelSpecError):
    """The model exists, but its architecture is not one this server implements."""


def check_model_type(config: dict[str, Any], where: str) -> None:
    """UnsupportedModel unless `config` (an HF config.json) is of a supported model_type."""
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    model_type = config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"{where} is a {model_type!r} model (config.json's model_type), an architecture"
            " pagemesh does not implement"
            f" (supported: {', '.join(SUPPORTED_MODEL_TYPES)}): choose a Llama-family model"
        )


def check_model(spec: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raises ModelSpecError when `spec` cannot name a servable model."""
    if spec == DEFAULT_MODEL:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelNotFound(
                f"{path} has no config.json, so it is not a Hugging Face model directory:"
                " give --model a model directory, a .gguf file or a hub id (org/name)"
            )
        check_model_type(_read_json(config), str(path))
        return
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}: check the path given to --model")
        return
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelNotFound(
            f"--model {spec!r} is neither a model directory, a .gguf file, nor a hub id"
            " (org/name): check the path or the id"
        )
    _check_hub(spec, timeout)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}: fix or replace the file") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} is not a JSON object: fix or replace the file")
    return data


def _check_hub(repo_id: str, timeout: float) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):  # the snapshot is here: no network needed
        check_model_type(_read_json(Path(cached)), repo_id)
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ModelNotFound(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set:"
            " unset it, or download the model and pass its directory to --model"
        )
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        raise ModelSpecError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its terms there and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private: set HF_TOKEN):"
            " check the id given to --model"
        ) from None
    except OfflineModeIsEnabled:
        raise ModelNotFound(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub is offline:"
            " download the model and pass its directory to --model"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status >= 500 or status == 429:
            return  # transient: the download is retried
        raise ModelSpecError(
            f"the Hugging Face hub refused {repo_id!r} (HTTP {status}): check the id and HF_TOKEN"
        ) from None
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ModelSpecError(
            f"cannot reach the Hugging Face hub ({endpoint}: {_reason(exc)}) to fetch"
            f" {repo_id!r}: check the network (or HF_ENDPOINT), or download the model"
            " elsewhere and pass its directory to --model"
        ) from None
    config = getattr(info, "config", None)
    if isinstance(config, dict) and "model_type" in config:
        check_model_type(config, repo_id)


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, no DNS, a timeout: whatever HTTP client the hub library uses."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "ConnectionError", "NetworkError"})


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
