"""The model card (a model folder's README.md): rendered from ``model_card.md``, its sections updated in
place, and kept on the Hub when edited there (``upload_model_folder``, the one way a folder is uploaded)."""
from __future__ import annotations

import glob
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, PyTorchModelHubMixin
from huggingface_hub.utils import filter_repo_objects

CARD_NAME = "README.md"
# a real file, not a link: links become one-line text files on Windows checkouts
MODEL_CARD_TEMPLATE = resources.files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
# Section markers: each effnetv2.evaluate / export --ship run replaces what lies between its pair.
CARD_BEGIN, CARD_END = "<!-- effnetv2.evaluate: begin -->", "<!-- effnetv2.evaluate: end -->"
GRAPHS_BEGIN, GRAPHS_END = "<!-- effnetv2.export: begin -->", "<!-- effnetv2.export: end -->"


def upload_model_folder(folder: str | Path, repo_id: str, *, commit_message: str = "Upload model with effnetv2",
                        private: bool | None = None, token: str | None = None, branch: str | None = None,
                        create_pr: bool | None = None, allow_patterns: list[str] | str | None = None,
                        ignore_patterns: list[str] | str | None = None, delete_patterns: list[str] | str | None = None,
                        overwrite_card: bool = False):
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the ``CommitInfo``. A README.md
    already in the repo (perhaps edited on the Hub) is neither uploaded over nor deleted unless ``overwrite_card``."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if not overwrite_card and api.file_exists(repo_id, CARD_NAME, revision=branch, token=token):
        ignore_patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        ignore_patterns.append(CARD_NAME)
        if delete_patterns is not None:  # spell out the files to delete, README.md excepted
            remote = api.list_repo_files(repo_id, revision=branch, token=token)
            doomed = filter_repo_objects([f for f in remote if f != CARD_NAME], allow_patterns=delete_patterns)
            delete_patterns = [glob.escape(f) for f in doomed] or None
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=branch,
                             create_pr=create_pr, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                             delete_patterns=delete_patterns)


def generate_model_card(model: PyTorchModelHubMixin, repo_id: str | None = None, metrics: dict | None = None,
                        datasets: list | None = None, base_model: str | None = None, dataset_name: str | None = None,
                        dataset_split: str = "validation", dataset_revision: str | None = None,
                        dataset_config: str | None = None, **sections: Any) -> ModelCard:
    """The model card (README.md) rendered from ``model_card.md``: ``metrics``, ``datasets``, ``base_model`` (and with
    ``dataset_name``, the accuracy's ``model-index``) in its YAML front matter; ``sections`` fill the template's."""
    cfg = model.config
    info = model._hub_mixin_info
    eval_results = None
    if dataset_name and metrics and "accuracy" in metrics:
        eval_results = [EvalResult(task_type="image-classification", dataset_type=dataset_name,
                                   dataset_name=dataset_name, dataset_split=dataset_split,
                                   dataset_revision=dataset_revision, dataset_config=dataset_config,
                                   metric_type="accuracy", metric_value=float(metrics["accuracy"]))]
    card_data = ModelCardData(
        library_name=info.model_card_data.library_name,
        license=info.model_card_data.license,
        pipeline_tag=info.model_card_data.pipeline_tag,
        tags=list(info.model_card_data.tags or []) + [f"efficientnetv2-{model.variant}"],
        datasets=datasets,
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        metrics=sorted(metrics) if metrics else None,
        model_name=(repo_id or f"efficientnetv2-{model.variant}") if eval_results else None,
        eval_results=eval_results,
    )
    size, names = cfg["image_size"], list(model.id2label.values())
    labels_text = ", ".join(f"`{n}`" for n in names[:20]) + (f", … ({len(names)} in all; see `config.json`)"
                                                            if len(names) > 20 else "")
    return ModelCard.from_template(
        card_data, template_str=info.model_card_template,
        title=f"EfficientNetV2-{model.variant.upper()}" + (f" — {repo_id}" if repo_id else ""),
        repo_id=repo_id or "ORG/NAME", variant=model.variant,
        num_params=sum(p.numel() for p in model.parameters()), num_classes=model.num_classes,
        pool_text="attention pooling" if model.pool_type == "attention" else "average pooling",
        base_model=base_model, source=cfg.get("source"), image_size=size,
        resize_size=int(size / cfg["crop_pct"]), train_image_size=cfg["train_image_size"],
        interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        labels_text=labels_text, metrics=metrics, drop_path_rate=cfg["drop_path_rate"],
        dropout=cfg["dropout"], padding=cfg["padding"], repo_url=info.repo_url, **sections,
    )


def card_section(result: dict, data: Path | str, command: str) -> str:
    """The card's evaluation section for ``effnetv2.evaluate``'s ``result`` on the shapes set at ``data`` (a
    Path), or on a dataset split (``data`` names it: accuracy rows only), measured with ``command``."""
    body = ["| metric | value |", "|---|---|", f"| accuracy | {result['accuracy']:.4f} |",
            *(f"| accuracy, {label} | {acc:.4f} |" for label, acc in result["per_class_accuracy"].items())]
    if not isinstance(data, Path):
        body = ["## Evaluation", "", f"{result['images']} images of {data}.", "", *body, ""]
    else:
        heads = ", ".join(f"{m:.2f}" for m in result["attention_mass_in_box_per_head"])
        maps = result.get("maps")
        body = [
            "## Evaluation on an unseen shapes set",
            "",
            f"{result['images']} images of `{data.name}`, generated with a seed the model never saw in "
            "training or validation.",
            "",
            *body,
            f"| attention mass inside the object box (pooled query, mean over heads) | "
            f"{result['attention_mass_in_box']:.3f} |",
            f"| the box's share of the image (what uniform attention would give) | {result['box_area_share']:.3f} |",
            f"| mass / share | {result['mass_over_share']:.2f}× |",
            f"| images whose attention mass in the box exceeds its area share | "
            f"{result['images_with_mass_above_share']:.1%} |",
            f"| mass in the box, per head | {heads} |",
            "",
            *([
                "How faithful each kind of map is to the predicted class (`effnetv2.explain`): cells are removed from "
                "(deletion, lower is better) or added to (insertion, higher is better) the pooling in the order the "
                "map ranks them, and the class probability is integrated over the fraction of cells.",
                "",
                "| map | deletion AUC ↓ | insertion AUC ↑ | mass in the box |",
                "|---|---|---|---|",
                *(f"| {kind} | {m['deletion_auc']:.3f} | {m['insertion_auc']:.3f} | {m['mass_in_box']:.3f} |"
                  for kind, m in maps.items()),
                "",
            ] if maps else []),
        ]
    return "\n".join([CARD_BEGIN, *body, "Measured with:", "", "```bash", command, "```", CARD_END])


def graphs_section(manifest: dict, files: dict[str, str]) -> str:
    """The card's section on the graphs shipped in ``onnx/`` (``ship_graphs``'s ``manifest``; ``files``:
    precision → path in the repo)."""
    rows = []
    for precision, graph in manifest["graphs"].items():
        if precision == "int8":
            agreement = graph.get("agreement")
            parity = (f"top-1 agreement with the float graph {agreement['top1_agreement']:.1%} on {agreement['images']} "
                      f"held-out images" if agreement else "not measured (no held-out images)")
            parity += f"; calibrated on {graph['calibration_images']} images"
        else:
            parity = f"relative error of the logits vs the eager model {graph['relative_error']:.1e}"
        rows.append(f"| `{files[precision]}` | {precision} | {graph['image_size'][0]}×{graph['image_size'][1]} | "
                    f"{parity} | `{graph['sha256'][:16]}…` |")
    return "\n".join([
        GRAPHS_BEGIN,
        "## Runtimes in this repo",
        "",
        "Exported graphs, ready for ONNX Runtime or OpenVINO: `Predictor(\"<this repo>\")` runs one after "
        f"checking its SHA-256 and that it was exported from these weights (fingerprint `{manifest['fingerprint'][:16]}…`, "
        "in `onnx/graphs.json`), and exports the graph itself otherwise.",
        "",
        "| file | precision | input | parity | sha256 |",
        "|---|---|---|---|---|",
        *rows,
        GRAPHS_END,
    ])


def update_card(card: Path, section: str) -> None:
    """Replace the section with ``section``'s markers (its first and last lines) in the card, or insert it
    before "## Architecture"."""
    text = card.read_text(encoding="utf-8")
    lines = section.strip().splitlines()
    begin, end = lines[0], lines[-1]
    if begin in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    elif "## Architecture" in text:
        before, after = text.split("## Architecture", 1)
        text = before + section + "\n\n## Architecture" + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.write_text(text, encoding="utf-8")


def record_eval_result(card: Path, dataset_name: str, split: str, accuracy: float) -> None:
    """Put ``accuracy`` on ``dataset_name``/``split`` into the card's ``model-index`` (replacing an earlier one)."""
    model_card = ModelCard.load(card)
    kept = [r for r in (model_card.data.eval_results or [])
            if not (r.dataset_name == dataset_name and r.dataset_split == split and r.metric_type == "accuracy")]
    model_card.data.eval_results = kept + [EvalResult(
        task_type="image-classification", dataset_type=dataset_name, dataset_name=dataset_name,
        dataset_split=split, metric_type="accuracy", metric_value=float(accuracy))]
    model_card.data.model_name = model_card.data.model_name or Path(card).parent.name
    model_card.save(card)

