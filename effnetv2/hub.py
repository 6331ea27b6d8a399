"""Hugging Face Hub access for ``EfficientNetV2``: resolve a file in a folder or a Hub repo, explain
download failures in plain words, and build a model from ``config.json`` plus its weights."""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from huggingface_hub import PyTorchModelHubMixin, constants, get_token, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from .checkpoint import (CLASSIFIER_KEYS, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, check_weight_shapes, read_state_dict,
                         safetensors_shapes)

logger = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 16 * 2**20  # model.MAX_CLASSES labels of 60 characters, twice (id2label, label2id): ~7 MB


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (even after huggingface_hub was imported) or huggingface_hub says offline."""
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


# A branch, tag (git ref names, e.g. "v1.0", "refs/pr/3") or commit id; no "..", no leading "-" or "/".
_REVISION = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._+/-]{0,254}(?<![./])")


def check_revision(revision: str | None) -> None:
    """``ValueError`` unless ``revision`` is None or looks like a branch, tag or commit id."""
    if revision is not None and not (isinstance(revision, str) and _REVISION.fullmatch(revision)):
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit id (letters, digits and . _ + - /, "
                         f"no '..'): give e.g. 'main', 'v1.0' or a commit hash")


class ModelDownloadError(OSError):
    """A model file could not be fetched from the Hub or the local cache; the message names the repo, says why
    and what to do."""

    def __init__(self, message: str, repo_id: str):
        super().__init__(message)
        self.repo_id = repo_id


def _describe(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


@contextmanager
def explained_download_errors(repo_id: str, filename: str, revision: str | None = None,
                              token: str | bool | None = None, local_files_only: bool = False) -> Iterator[None]:
    """Re-raise download errors of ``filename`` inside the block as a ``ModelDownloadError`` saying why and what to
    do (others as they are), JSON errors as a ``ValueError``."""
    try:
        yield
    except json.JSONDecodeError as err:
        raise ValueError(f"{_config_where(repo_id, revision)} is not valid JSON ({err}): it was not written by "
                         "save_pretrained, or it was damaged; save or upload the model again") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        repo = _describe(repo_id, revision)
        login = "`hf auth login` (or set HF_TOKEN, or pass token=...)"
        if isinstance(err, GatedRepoError):
            message = (f"{repo} is gated: ask for access on {constants.ENDPOINT}/{repo_id}, then log in with {login} "
                       f"as the account that was granted access, and retry.")
        elif isinstance(err, RepositoryNotFoundError):
            sent_token = token if isinstance(token, str) else (get_token() if token is not False else None)
            if sent_token:
                message = (f"{repo} was not found with the Hugging Face token in use: check the spelling; if the repo "
                           f"is private, log in as an account that can read it with {login}.")
            else:
                message = (f"{repo} was not found. It may be private or gated: log in with {login} and retry. Or it "
                           f"may not exist: check the spelling (no Hugging Face token is set; if you meant a local "
                           f"folder, it does not exist).")
        elif isinstance(err, RevisionNotFoundError):
            message = (f"{_describe(repo_id, None)} has no revision {revision!r}: give an existing branch, tag or "
                       f"commit id (HfApi().list_repo_refs({repo_id!r}) lists them), or drop the revision for the "
                       f"latest.")
        elif isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 401:
            message = (f"the Hub at {constants.ENDPOINT} refused the Hugging Face token while fetching {filename} of "
                       f"{repo} (401: {err.server_message or 'invalid credentials'}): the token is invalid, expired "
                       f"or revoked. Log in again with {login}, or unset HF_TOKEN to read public repos.")
        elif isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            cache = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
            if is_offline():
                message = (f"{filename} of {repo} is not in {cache} and this machine is offline (HF_HUB_OFFLINE=1 "
                           f"is set), so it cannot be downloaded. Download the model once while online (run the same "
                           f"command without HF_HUB_OFFLINE=1, or `hf download {repo_id}`), or pass a local folder "
                           f"written by save_pretrained.")
            elif local_files_only:
                message = (f"{filename} of {repo} is not in {cache} and local_files_only=True forbids downloading "
                           f"it: load it once without local_files_only, or pass a local folder written by "
                           f"save_pretrained.")
            else:
                message = (f"could not reach the Hub at {constants.ENDPOINT} to download {filename} of {repo}, and "
                           f"it is not in {cache}: check the network connection (and HF_ENDPOINT), then retry, or "
                           f"pass a local folder written by save_pretrained.")
        else:
            raise
        raise ModelDownloadError(message, repo_id) from None


def _config_where(model_id: str, revision: str | None) -> str:
    """How messages name ``config.json``: its path in a local folder, else the Hub repo's file."""
    if os.path.isdir(model_id):
        return os.path.join(model_id, CONFIG_NAME)
    return f"{CONFIG_NAME} of {_describe(model_id, revision)}"


def check_config_size(model_id: str) -> None:
    """Refuse a local folder's ``config.json`` above ``MAX_CONFIG_BYTES`` before it is parsed."""
    path = os.path.join(model_id, CONFIG_NAME)
    if os.path.isdir(model_id) and os.path.isfile(path) and os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {os.path.getsize(path):,} bytes, more than the {MAX_CONFIG_BYTES:,} a model's "
                         f"settings and labels need: it was not written by save_pretrained, or it was damaged")


def check_config_is_an_object(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> None:
    """``ValueError`` naming ``config.json`` when it holds JSON that is not an object (quiet when not at hand)."""
    try:
        path = resolve_file(model_id, CONFIG_NAME, revision, local_files_only=True, cache_dir=cache_dir)
        value = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (ModelDownloadError, OSError, ValueError):
        return
    if not isinstance(value, dict):
        raise ValueError(f"{_config_where(model_id, revision)} holds a JSON {type(value).__name__}, not an object "
                         "of settings: it was not written by save_pretrained, or it was damaged; save or upload the "
                         "model again") from None


def resolve_file(model_id: str, filename: str, revision: str | None = None, token: str | bool | None = None,
                 local_files_only: bool = False, **download_kwargs: Any) -> str | None:
    """Path of ``filename`` in a local folder or a Hub repo (downloaded into the cache), or None when there
    is no such file; download problems raise ``ModelDownloadError``."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        return path if os.path.isfile(path) else None
    with explained_download_errors(model_id, filename, revision, token, local_files_only):
        try:
            return hf_hub_download(repo_id=model_id, filename=filename, revision=revision, token=token,
                                   local_files_only=local_files_only, **download_kwargs)
        except RemoteEntryNotFoundError:
            return None


def load_pretrained(cls: type[PyTorchModelHubMixin], *, model_id: str, config: dict | None, map_location: str,
                    revision: str | None, cache_dir: str | None, force_download: bool, local_files_only: bool,
                    token: str | bool | None, **kwargs: Any) -> PyTorchModelHubMixin:
    """Build the model from its config (``kwargs``: with the caller's overrides) and load its weights strictly."""
    is_dir = os.path.isdir(model_id)
    download_kwargs = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                           local_files_only=local_files_only, token=token)
    if config is None:
        if is_dir:
            raise FileNotFoundError(f"{model_id} has no {CONFIG_NAME}: point at a folder written by save_pretrained "
                                    f"or train.py")
        # huggingface_hub's from_pretrained only logs why config.json could not be fetched: ask again to say why
        if resolve_file(model_id, CONFIG_NAME, **download_kwargs) is None:
            raise FileNotFoundError(
                f"{_describe(model_id, revision)} has no {CONFIG_NAME}: it is not an effnetv2 model (those hold "
                f"config.json and model.safetensors, written by save_pretrained, push_to_hub, train.py or "
                f"`python -m effnetv2.convert`)")
        raise ModelDownloadError(f"{CONFIG_NAME} of {_describe(model_id, revision)} could not be fetched (a passing "
                                 f"Hub error?): retry", model_id)
    config_path = _config_where(model_id, revision)
    unknown = sorted(set(config) - set(cls._hub_mixin_init_parameters) - {"self"})
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; it was not written by this version of effnetv2")
    new_head = "num_classes" in kwargs and kwargs["num_classes"] != config.get("num_classes")
    if new_head and kwargs.get("id2label") is config.get("id2label"):
        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
    elif "id2label" in kwargs and kwargs.get("label2id") is config.get("label2id"):
        kwargs.pop("label2id", None)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path} does not describe a valid model: {err}") from None
    for filename in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):  # safetensors first
        if (weights := resolve_file(model_id, filename, **download_kwargs)) is not None:
            break
    else:
        where = model_id if is_dir else _describe(model_id, revision)
        raise FileNotFoundError(f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}: save or upload the weights "
                                f"with save_pretrained/push_to_hub")
    name = weights if is_dir else f"{filename} of {_describe(model_id, revision)} (cached at {weights})"
    if filename == WEIGHTS_NAME:  # shapes checked from the header before any tensor is read
        check_weight_shapes(model, safetensors_shapes(weights, name), name, reinit_classifier=new_head)
    state = read_state_dict(weights, map_location, name=name)
    new_classifier = check_weight_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, name, new_head)
    if new_classifier:
        logger.warning("head.classifier re-initialised for %d classes (%s has %d); the rest of the weights are "
                       "loaded", model.num_classes, name, state[CLASSIFIER_KEYS[0]].shape[0])
        state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
    model.load_state_dict(state, strict=not new_classifier)
    return model.to(map_location).eval()
