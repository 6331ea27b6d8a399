"""Hugging Face Hub plumbing for ``EfficientNetV2``: labels, safetensors I/O, the model card.

Weights are only ever read from safetensors (or a ``.bin``/``.pth`` through
``torch.load(weights_only=True)``): loading a model never unpickles arbitrary objects.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import filter_repo_objects

if TYPE_CHECKING:
    from .model import EfficientNetV2

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
# Package data (a real file, not a link: links become one-line text files on Windows checkouts).
MODEL_CARD_TEMPLATE = resources.files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
CLASSIFIER_KEYS = ("head.classifier.weight", "head.classifier.bias")
# config.json with 50,000 labels (model.MAX_CLASSES) of 60 characters, twice (id2label, label2id): ~7 MB.
MAX_CONFIG_BYTES = 16 * 2**20
# A safetensors header is ~100 bytes per tensor: EfficientNetV2-XL with an attention pool needs 0.2 MB.
MAX_HEADER_BYTES = 8 * 2**20


def normalise_labels(id2label: dict | None, label2id: dict | None,
                     num_classes: int) -> tuple[dict[str, str], dict[str, int]]:
    """Labels as stored in ``config.json``: ``{"0": name}`` and ``{name: 0}``, checked against
    ``num_classes``. Missing labels default to the class index."""
    if id2label is None:
        id2label = {i: str(i) for i in range(num_classes)}
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict of class index → name, got {type(id2label).__name__}")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be class indices (0..{num_classes - 1})") from None
    if sorted(labels) != list(range(num_classes)):
        raise ValueError(f"id2label has {len(labels)} labels with indices {sorted(labels)[:5]}..., but "
                         f"num_classes={num_classes}: give one label for each index 0..{num_classes - 1}")
    id2label = {str(i): labels[i] for i in range(num_classes)}
    derived = {name: int(i) for i, name in id2label.items()}
    if len(derived) != num_classes:
        raise ValueError("id2label has duplicate class names: every class needs its own name")
    if label2id is not None and {str(k): v for k, v in label2id.items()} != derived:
        raise ValueError("label2id does not match id2label: drop label2id, it is derived from id2label")
    return id2label, derived


def save_weights(model: "EfficientNetV2", directory: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "effnetv2"})


def _unpickling_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused (e.g. "Unsupported global: GLOBAL posix.system"),
    without its advice to allow-list the object or to turn the check off."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).replace("WeightsUnpickler error:", "").strip()
             for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Weights only load failed")]
    reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(err).__name__)
    return reason.split(" Please use")[0]


def _unreadable_safetensors(name: str, reason: object) -> ValueError:
    return ValueError(f"{name} is not a readable safetensors file ({reason}); it may be corrupt or truncated: save "
                      f"or upload it again (for a damaged download, retry with force_download=True)")


def safetensors_shapes(path: str | os.PathLike, name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a ``.safetensors`` file's header alone (no tensor is read).

    The header (an 8-byte little-endian length, then JSON) is refused above ``MAX_HEADER_BYTES``,
    so a file declaring millions of tensors costs nothing to reject. ``name`` is for messages.
    """
    name = name or str(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise _unreadable_safetensors(name, f"its header claims {length:,} bytes; at most "
                                                f"{MAX_HEADER_BYTES:,} are accepted" if length > 0 else "no header")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        return {key: tuple(int(n) for n in entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _unreadable_safetensors(name, f"bad header: {type(err).__name__}") from None


def read_state_dict(path: str | os.PathLike, map_location: str = "cpu", name: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or a ``.bin``/``.pth`` read with ``weights_only=True``.

    ``name`` says where the file comes from in error messages (default: its path).
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {name} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        safetensors_shapes(path, name)  # refuses an oversized header before safetensors parses it
        try:
            return load_file(str(path), device=map_location)
        except Exception as err:  # safetensors raises its own error type and OSError variants
            raise _unreadable_safetensors(name, err) from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{name} could not be read as a weights-only PyTorch checkpoint ({_unpickling_reason(err)}). "
                         f"Only plain state dicts of tensors are accepted: pickled objects are never loaded, since "
                         f"unpickling can run code. Prefer safetensors (save_pretrained writes "
                         f"model.safetensors).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name} does not hold a state dict of tensors")
    return state


def check_weight_shapes(model: "EfficientNetV2", shapes: dict[str, tuple[int, ...]], path: str,
                        reinit_classifier: bool = False) -> bool:
    """Check stored tensor ``shapes`` against ``model`` (all keys, all shapes) before loading.

    Returns True when only the classifier's size differs and ``reinit_classifier`` allows a new
    one; otherwise a mismatch raises a ``ValueError`` naming ``path`` (and, for the classifier
    alone, how to load with a new ``num_classes``).
    """
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [k for k in own if k in shapes and tuple(shapes[k]) != own[k]]
    if missing or unexpected or (mismatched and set(mismatched) - set(CLASSIFIER_KEYS)):
        lines = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                lines.append(f"{what}: {shown}")
        raise ValueError(f"the weights in {path} do not fit EfficientNetV2-{model.variant} "
                         f"(pool={model.pool_type!r}, num_classes={model.num_classes}): " + "; ".join(lines)
                         + ". Check that config.json belongs to these weights.")
    if mismatched and not reinit_classifier:
        raise ValueError(
            f"only the classifier differs: {path} has {shapes[CLASSIFIER_KEYS[0]][0]} classes but the model was "
            f"built for {model.num_classes}. To fine-tune on new classes, load with "
            f"EfficientNetV2.from_pretrained(..., num_classes={model.num_classes}) (optionally "
            f"id2label=...): the backbone is loaded and the classifier re-initialised.")
    return bool(mismatched)


def load_state_dict_checked(model: "EfficientNetV2", state: dict[str, torch.Tensor], path: str,
                            reinit_classifier: bool = False) -> None:
    """Load strictly; when only the classifier's size differs, re-initialise it if allowed, else say
    how to. Every error names ``path``."""
    if check_weight_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, path, reinit_classifier):
        stored = state[CLASSIFIER_KEYS[0]].shape[0]
        logger.warning("%s re-initialised for %d classes (%s has %d); the rest of the weights are loaded",
                       CLASSIFIER_KEYS[0].rsplit(".", 1)[0], model.num_classes, path, stored)
        model.load_state_dict({k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}, strict=False)
        return
    model.load_state_dict(state, strict=True)


def is_offline() -> bool:
    """True when the network is known to be off limits: ``HF_HUB_OFFLINE`` is set (even after
    huggingface_hub was imported) or huggingface_hub's constants say offline."""
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


# A branch, tag (git ref names, e.g. "v1.0", "refs/pr/3") or commit id; no "..", no leading "-" or "/".
_REVISION = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._+/-]{0,254}(?<![./])")


def check_revision(revision: str | None) -> None:
    """``ValueError`` unless ``revision`` is None or looks like a branch, tag or commit id."""
    if revision is not None and not (isinstance(revision, str) and _REVISION.fullmatch(revision)):
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit id (letters, digits and . _ + - /, "
                         f"no '..'): give e.g. 'main', 'v1.0' or a commit hash")


class ModelDownloadError(OSError):
    """A model file could not be fetched from the Hub or the local cache. The message names the repo,
    says why (not found or private, gated, unknown revision, offline, unreachable) and what to do."""

    def __init__(self, message: str, repo_id: str):
        super().__init__(message)
        self.repo_id = repo_id


def _describe(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def explain_download_error(err: Exception, repo_id: str, filename: str, revision: str | None = None,
                           token: str | bool | None = None, local_files_only: bool = False
                           ) -> ModelDownloadError | None:
    """A ``ModelDownloadError`` that says in plain words why ``filename`` of ``repo_id`` could not be
    fetched, or None when ``err`` is not a download problem this knows."""
    repo = _describe(repo_id, revision)
    login = "`hf auth login` (or set HF_TOKEN, or pass token=...)"
    if isinstance(err, GatedRepoError):
        message = (f"{repo} is gated: ask for access on {constants.ENDPOINT}/{repo_id}, then log in with {login} "
                   f"as the account that was granted access, and retry.")
    elif isinstance(err, RepositoryNotFoundError):
        sent_token = token if isinstance(token, str) else (get_token() if token is not False else None)
        if sent_token:
            message = (f"{repo} was not found with the Hugging Face token in use: check the spelling; if the repo is "
                       f"private, log in as an account that can read it with {login}.")
        else:
            message = (f"{repo} was not found. It may be private or gated: log in with {login} and retry. Or it may "
                       f"not exist: check the spelling (no Hugging Face token is set; if you meant a local folder, "
                       f"it does not exist).")
    elif isinstance(err, RevisionNotFoundError):
        message = (f"{_describe(repo_id, None)} has no revision {revision!r}: give an existing branch, tag or commit "
                   f"id (HfApi().list_repo_refs({repo_id!r}) lists them), or drop the revision for the latest.")
    elif isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 401:
        message = (f"the Hub at {constants.ENDPOINT} refused the Hugging Face token while fetching {filename} of "
                   f"{repo} (401: {err.server_message or 'invalid credentials'}): the token is invalid, expired or "
                   f"revoked. Log in again with {login}, or unset HF_TOKEN to read public repos.")
    elif isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
        if is_offline():
            message = (f"{filename} of {repo} is not in {cache} and this machine is offline (HF_HUB_OFFLINE=1 is "
                       f"set), so it cannot be downloaded. Download the model once while online (run the same "
                       f"command without HF_HUB_OFFLINE=1, or `hf download {repo_id}`), or pass a local folder "
                       f"written by save_pretrained.")
        elif local_files_only:
            message = (f"{filename} of {repo} is not in {cache} and local_files_only=True forbids downloading it: "
                       f"load it once without local_files_only, or pass a local folder written by save_pretrained.")
        else:
            message = (f"could not reach the Hub at {constants.ENDPOINT} to download {filename} of {repo}, and it "
                       f"is not in {cache}: check the network connection (and HF_ENDPOINT), then retry, or pass a "
                       f"local folder written by save_pretrained.")
    else:
        return None
    return ModelDownloadError(message, repo_id)


@contextmanager
def explained_download_errors(repo_id: str, filename: str, revision: str | None = None,
                              token: str | bool | None = None, local_files_only: bool = False) -> Iterator[None]:
    """Re-raise huggingface_hub's download errors inside the block as ``ModelDownloadError``,
    naming the repo and saying what to do; JSON errors in ``config.json`` as a ``ValueError`` naming it."""
    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        explained = explain_download_error(err, repo_id, filename, revision, token, local_files_only)
        if explained is None:
            raise
        raise explained from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{_config_where(repo_id, revision)} is not valid JSON ({err}): it was not written by "
                         "save_pretrained, or it was damaged; save or upload the model again") from None


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
    """Raise a ``ValueError`` naming ``config.json`` when it holds JSON that is not an object (a list,
    a number...); return quietly otherwise, or when the file is not at hand."""
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
    """Path of ``filename`` in a local folder or a Hub repo (downloaded into the cache), or None when
    the folder or repo has no such file. Download problems raise ``ModelDownloadError``."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        return path if os.path.isfile(path) else None
    with explained_download_errors(model_id, filename, revision, token, local_files_only):
        try:
            return hf_hub_download(repo_id=model_id, filename=filename, revision=revision, token=token,
                                   local_files_only=local_files_only, **download_kwargs)
        except RemoteEntryNotFoundError:
            return None


def load_pretrained(cls: type["EfficientNetV2"], *, model_id: str, config: dict | None, map_location: str,
                    model_kwargs: dict, **download_kwargs: Any) -> "EfficientNetV2":
    """Build the model from its config (plus the caller's overrides) and load its weights strictly."""
    is_dir = os.path.isdir(model_id)
    revision = download_kwargs.get("revision")
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
    kwargs = dict(model_kwargs)
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
    weights = resolve_file(model_id, WEIGHTS_NAME, **download_kwargs)
    filename = WEIGHTS_NAME
    if weights is None:
        weights, filename = resolve_file(model_id, PICKLE_WEIGHTS_NAME, **download_kwargs), PICKLE_WEIGHTS_NAME
    if weights is None:
        where = model_id if is_dir else _describe(model_id, revision)
        raise FileNotFoundError(f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}: save or upload the weights "
                                f"with save_pretrained/push_to_hub")
    name = weights if is_dir else f"{filename} of {_describe(model_id, revision)} (cached at {weights})"
    if filename == WEIGHTS_NAME:  # shapes checked from the header before any tensor is read
        check_weight_shapes(model, safetensors_shapes(weights, name), name, reinit_classifier=new_head)
    state = read_state_dict(weights, map_location, name=name)
    load_state_dict_checked(model, state, name, reinit_classifier=new_head)
    return model.to(map_location).eval()


def card_upload_patterns(repo_id: str, *, token: str | bool | None = None, revision: str | None = None,
                         ignore_patterns: list[str] | str | None = None,
                         delete_patterns: list[str] | str | None = None,
                         ) -> tuple[list[str] | str | None, list[str] | str | None]:
    """``ignore_patterns`` and ``delete_patterns`` for an ``upload_folder`` that keeps the model card
    already in ``repo_id`` (it may have been edited on the Hub): README.md is neither uploaded nor
    deleted. Unchanged when the repo has no card yet."""
    api = HfApi(token=token)
    if not api.file_exists(repo_id, CARD_NAME, revision=revision, token=token):
        return ignore_patterns, delete_patterns
    as_list = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
    if delete_patterns is not None:  # spell out the files to delete, README.md excepted
        remote = api.list_repo_files(repo_id, revision=revision, token=token)
        doomed = filter_repo_objects([f for f in remote if f != CARD_NAME], allow_patterns=delete_patterns)
        delete_patterns = [glob.escape(f) for f in doomed] or None
    return [*as_list, CARD_NAME], delete_patterns


def _labels_text(id2label: dict[str, str], limit: int = 20) -> str:
    names = list(id2label.values())
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f", … ({len(names)} in all; see `config.json`)" if len(names) > limit else "")


def generate_model_card(model: "EfficientNetV2", repo_id: str | None = None, metrics: dict | None = None,
                        dataset: str | None = None, datasets: list | None = None,
                        base_model: str | None = None, training: dict | None = None,
                        command: str | None = None, notes: str | None = None, **extra: Any) -> ModelCard:
    """The model card (README.md) rendered from ``model_card.md`` with the model's real metadata.

    ``metrics`` ({name: value}), ``dataset``/``datasets``, ``base_model``, ``training`` (settings)
    and ``command`` (to reproduce) fill the optional sections and the YAML front matter.
    """
    cfg = model.config
    info = model._hub_mixin_info
    card_data = ModelCardData(
        library_name=info.model_card_data.library_name,
        license=info.model_card_data.license,
        pipeline_tag=info.model_card_data.pipeline_tag,
        tags=list(info.model_card_data.tags or []) + [f"efficientnetv2-{model.variant}"],
        datasets=datasets,
        base_model=base_model,
        metrics=sorted(metrics) if metrics else None,
    )
    size = cfg["image_size"]
    return ModelCard.from_template(
        card_data, template_str=info.model_card_template,
        title=extra.pop("title", None) or f"EfficientNetV2-{model.variant.upper()}"
        + (f" — {repo_id}" if repo_id else ""),
        repo_id=repo_id or "ORG/NAME", variant=model.variant,
        num_params=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes,
        pool_text="attention pooling" if model.pool_type == "attention" else "average pooling",
        base_model=base_model, source=cfg.get("source"), image_size=size,
        resize_size=int(size / cfg["crop_pct"]), train_image_size=cfg["train_image_size"],
        interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        labels_text=_labels_text(model.id2label), metrics=metrics, dataset=dataset, training=training,
        command=command, notes=notes, drop_path_rate=cfg["drop_path_rate"], dropout=cfg["dropout"],
        padding=cfg["padding"], repo_url=info.repo_url, **extra,
    )
