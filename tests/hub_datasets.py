"""Tiny image-classification datasets for the tests, as the Hub stores them (parquet shards with the
images' bytes and a ClassLabel, a card with the splits' sizes) and as ``save_to_disk`` writes them."""
from __future__ import annotations

import io
from pathlib import Path

from effnetv2.data import scan_folder
from effnetv2.shapes import make_shapes_dataset

CLASSES = ["circle", "square", "triangle"]


def shapes_rows(root: Path, num_per_class: int, seed: int) -> dict:
    """``{"image": [{"bytes", "path"}], "label": [...]}`` of a rendered shapes set (32 px, CLASSES)."""
    samples, classes = scan_folder(make_shapes_dataset(root, num_per_class, 32, seed, tuple(CLASSES)))
    assert classes == CLASSES
    return {"image": [{"bytes": Path(path).read_bytes(), "path": None} for path, _ in samples],
            "label": [label for _, label in samples]}


def features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})


def hub_files(splits: dict[str, dict], shards: int = 2) -> dict[str, bytes]:
    """A dataset repo's files for ``splits`` (name → rows): ``shards`` parquet files per split, rows
    dealt round-robin, and a README.md whose metadata holds the features and the splits' sizes."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    files = {}
    for split, rows in splits.items():
        for shard in range(shards):
            part = datasets.Dataset.from_dict({k: v[shard::shards] for k, v in rows.items()}, features=features())
            buffer = io.BytesIO()
            part.to_parquet(buffer)
            files[f"data/{split}-{shard:05d}-of-{shards:05d}.parquet"] = buffer.getvalue()
    sizes = SplitDict({name: SplitInfo(name, num_examples=len(rows["label"])) for name, rows in splits.items()})
    card = DatasetCardData()
    DatasetInfosDict({"default": DatasetInfo(features=features(), splits=sizes)}).to_dataset_card_data(card)
    card["configs"] = [{"config_name": "default", "data_files": [{"split": name, "path": f"data/{name}-*"}
                                                                 for name in splits]}]
    files["README.md"] = f"---\n{card.to_yaml()}\n---\n# shapes\n".encode()
    return files
