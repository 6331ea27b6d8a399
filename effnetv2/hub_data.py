"""What train.py trains on: a folder-per-class set (:mod:`effnetv2.data`) or a Hub dataset (or a
``save_to_disk`` folder), as one :class:`TrainingData`. A dataset's images are decoded by
:func:`effnetv2.images.open_image`, not by ``datasets``: the same limits and bad-image rules as files.
"""
from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms.functional import to_tensor

from .data import (DatasetError, ImageFolderDataset, report_bad_files, save_class_indices, scan_folder,
                   split_samples, write_split)
from .data import check_images as check_image_files
from .images import ImageLoadError, open_image
from .run_folder import data_fingerprint

VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


@dataclass
class HubDataset:
    """A Hub dataset (or ``save_to_disk`` folder) opened: its splits (``datasets`` objects, images left
    encoded), the image and label columns, the class names, and what names it on a card."""

    name: str  # the Hub id, or the folder's name
    revision: str | None  # the commit it was read at (None: a local folder)
    config: str | None
    splits: dict
    image_column: str
    label_column: str
    classes: list[str]
    on_hub: bool = True


def open_hub_dataset(dataset: str, config: str | None = None, image_column: str | None = None,
                     label_column: str | None = None, streaming: bool = False) -> HubDataset:
    """Open ``dataset`` (``org/name``, ``org/name@revision``, or a ``save_to_disk`` folder) with the
    ``datasets`` library; :class:`DatasetError` says what is wrong (not found, offline, columns)."""
    import datasets

    local = Path(dataset).is_dir()
    repo_id, _, revision = dataset.partition("@")
    if local and streaming:
        raise DatasetError(f"--streaming reads a Hub dataset; {dataset} is a local folder: drop --streaming")
    try:
        if local:
            loaded, sha = datasets.load_from_disk(dataset), None
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            builder = datasets.load_dataset_builder(repo_id, config, revision=revision or None)
            sha = builder.hash
            if streaming:
                splits = dict(builder.as_streaming_dataset())
            else:
                builder.download_and_prepare()
                splits = dict(builder.as_dataset())
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DatasetError(f"--dataset {dataset}: {err} Check the id (org/name), or log in (`hf auth login`) "
                           f"for a private or gated one") from None
    except FileNotFoundError as err:
        raise DatasetError(f"--dataset {dataset}: {err}") from None
    except ConnectionError as err:
        raise DatasetError(f"--dataset {dataset}: {err}; it is not in the local cache either. Connect once (it is "
                           f"cached), or unset HF_HUB_OFFLINE") from None
    except ValueError as err:  # e.g. a dataset with several configurations and none chosen
        raise DatasetError(f"--dataset {dataset}: {err} (--dataset-config)") from None
    features = next(iter(splits.values())).features
    image, label = find_columns(features, image_column, label_column)
    splits = {name: split.select_columns([image, label]).cast_column(image, datasets.Image(decode=False))
              for name, split in splits.items()}
    return HubDataset(Path(dataset).resolve().name if local else repo_id, sha, config, splits, image, label,
                      list(features[label].names), on_hub=not local)


def find_columns(features, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label columns of ``features`` (``datasets.Features``): those named, or its one
    ``Image`` and one ``ClassLabel`` feature. The error lists every column with its type."""
    from datasets import ClassLabel, Image

    def kind(feature) -> str:
        return f"Value({feature.dtype})" if type(feature).__name__ == "Value" else type(feature).__name__

    columns = ", ".join(f"{name} ({kind(f)})" for name, f in features.items())
    chosen = []
    for given, want, flag in ((image_column, Image, "--image-column"), (label_column, ClassLabel, "--label-column")):
        found = [given] if given is not None else [n for n, f in features.items() if isinstance(f, want)]
        if given is not None and given not in features:
            raise DatasetError(f"{flag} {given}: the dataset has no such column; its columns are {columns}")
        if len(found) != 1:
            raise DatasetError(f"the dataset has {len(found) or 'no'} {want.__name__} column(s) among its columns "
                               f"{columns}: name the one to use with {flag}")
        if not isinstance(features[found[0]], want):
            raise DatasetError(f"{flag} {found[0]} is a {kind(features[found[0]])} column, not {want.__name__}; the "
                               f"dataset's columns are {columns}" + (
                                   ". Make it one with `dataset.class_encode_column(...)`" if want is ClassLabel else ""))
        chosen.append(found[0])
    return chosen[0], chosen[1]


def _encoded(cell: dict | None) -> bytes | str | None:
    """A cell's encoded image (bytes, or the local file it came from); None when the row has none."""
    return None if cell is None else cell["bytes"] if cell["bytes"] is not None else cell["path"]


def _open_cell(cell: dict | None, name: str):
    """A cell's image decoded by ``open_image``; ``ImageLoadError`` naming ``name`` when it cannot be."""
    try:
        if (source := _encoded(cell)) is None:
            raise ImageLoadError(name, "the row has no image")
        return open_image(source)
    except ImageLoadError as err:
        raise ImageLoadError(name, err.reason) from None


class RowImages:
    """``read`` for :class:`~effnetv2.data.ImageFolderDataset` over one split: row ``i``'s image
    (``ImageLoadError`` naming the row when unreadable)."""

    def __init__(self, split, column: str, name: str):
        self.split, self.column, self.name = split, column, name

    def source(self, index: int) -> bytes | str | None:
        return _encoded(self.split[int(index)][self.column])

    def row_name(self, index: int) -> str:
        return f"{self.name} row {index}"

    def __call__(self, index: int):
        return _open_cell(self.split[int(index)][self.column], self.row_name(index))


class StreamedImages(IterableDataset):
    """``(image, label)`` pairs of a streamed split; an unreadable image is warned about and skipped.
    ``len()`` is the number of examples an epoch counts (the split's size)."""

    def __init__(self, stream, image_column: str, label_column: str, name: str, length: int,
                 transform: Callable | None = None):
        self.stream, self.image_column, self.label_column = stream, image_column, label_column
        self.name, self.length, self.transform = name, length, transform

    def set_transform(self, transform: Callable | None) -> None:
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # a new shard order and shuffle buffer each epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for row in self.stream:
            try:
                image = _open_cell(row[self.image_column], self.name)
            except ImageLoadError as err:
                warnings.warn(f"skipping an unreadable image of {self.name}: {err.reason}", stacklevel=2)
                continue
            yield (self.transform or to_tensor)(image), row[self.label_column]


class StreamBatches:
    """One process's batches of its own shards: exactly ``steps`` per epoch (its shards start again if
    they run out first, so every process takes the same steps), already on ``device``. Not a
    ``DataLoader``: Accelerate's ``prepare`` leaves it as it is instead of sharding it again."""

    def __init__(self, dataset: StreamedImages, batch_size: int, workers: int, steps: int, device):
        self.dataset, self.batch_size, self.workers, self.steps, self.device = dataset, batch_size, workers, steps, device

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        loader = DataLoader(self.dataset, self.batch_size, num_workers=self.workers, drop_last=True)
        done = 0
        while done < self.steps:
            before = done
            for x, y in loader:
                yield x.to(self.device), y.to(self.device)
                done += 1
                if done == self.steps:
                    return
            if done == before:
                raise DatasetError(f"{self.dataset.name}: this process's shards hold less than a batch of "
                                   f"{self.batch_size}: lower --batch-size")


@dataclass
class TrainingData:
    """A run's training and validation sets (``set_transform`` on both), class names, the fingerprint the
    resume check compares, and the model card's dataset fields (``dataset_name``, ``dataset``, ...)."""

    train: ImageFolderDataset | StreamedImages
    val: ImageFolderDataset | StreamedImages
    classes: list[str]
    fingerprint: dict
    card: dict
    split_record: Callable[[Path], None]  # writes split.json
    streams: dict = field(default_factory=dict)  # streaming: the train split and the image/label columns

    def save(self, out: Path) -> None:
        """``class_indices.json`` and ``split.json`` (which images went where) into ``out``."""
        save_class_indices(out / "class_indices.json", self.classes)
        self.split_record(out / "split.json")

    def loaders(self, accelerator, batch_size: int, workers: int, eval_transform: Callable, precise_bn: int,
                seed: int) -> tuple:
        """(train loader, val loader, precise-BatchNorm loader or None). The train set's transform is set
        per stage; the others use ``eval_transform``."""
        self.val.set_transform(eval_transform)
        rank, world = accelerator.process_index, accelerator.num_processes
        if self.streams:
            return self._stream_loaders(accelerator, batch_size, workers, eval_transform, precise_bn, seed)
        # whole steps only (see epoch_coverage), when there is at least one
        train_loader = DataLoader(self.train, batch_size, shuffle=True, num_workers=workers,
                                  drop_last=len(self.train) >= batch_size * world)
        # no drop_last: Accelerate pads the last batches with repeats (even_batches) and gather_for_metrics
        # removes them, so every validation image counts exactly once
        val_loader = DataLoader(self.val, batch_size, num_workers=workers)
        if precise_bn <= 0:
            return train_loader, val_loader, None
        # Precise BatchNorm: a fixed sample of training images, seen as at evaluation, split over processes.
        calib = random.Random(seed).sample(self.train.samples, min(precise_bn, len(self.train)))
        calib = calib[rank::world] or calib
        calib_set = ImageFolderDataset(calib, self.classes, eval_transform, read=self.train.read)
        return train_loader, val_loader, DataLoader(calib_set, batch_size, num_workers=workers)

    def _stream_loaders(self, accelerator, batch_size, workers, eval_transform, precise_bn, seed) -> tuple:
        from datasets.distributed import split_dataset_by_node

        rank, world = accelerator.process_index, accelerator.num_processes
        stream, image, label = self.streams["train"], self.streams["image"], self.streams["label"]
        shards = stream.n_shards
        mine = split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=1000), rank, world)
        print(f"process {rank} of {world}: streaming "
              + (f"shards {list(range(rank, shards, world))} of {shards}" if shards % world == 0 else
                 f"every shard ({shards} do not divide among {world} processes), keeping every {world}-th example"),
              flush=True)
        self.train.stream = mine
        steps = max(1, len(self.train) // (batch_size * world))
        train_loader = StreamBatches(self.train, batch_size, workers, steps, accelerator.device)
        # a torch IterableDataset: Accelerate's prepare() has the main process read it and send each its part
        val_loader = DataLoader(self.val, batch_size, num_workers=min(workers, self.val.stream.n_shards))
        if precise_bn <= 0:
            return train_loader, val_loader, None
        calib = StreamedImages(split_dataset_by_node(stream, rank, world).take(-(-precise_bn // world)), image, label,
                               self.train.name, precise_bn, eval_transform)
        return train_loader, val_loader, DataLoader(calib, batch_size)


def load_training_data(*, data_path: str | None = None, dataset: str | None = None, config: str | None = None,
                       image_column: str | None = None, label_column: str | None = None, streaming: bool = False,
                       val_fraction: float = 0.2, seed: int = 0, check_images: bool = True, workers: int = 4,
                       report: bool = True) -> TrainingData:
    """The data of a run on ``data_path`` (a folder per class) or ``dataset`` (see :func:`open_hub_dataset`):
    unreadable images dropped (``report``: warned about, once), the validation set (the dataset's own
    validation split, else the seeded stratified ``val_fraction`` of each class). DatasetError when it
    cannot be trained on."""
    if (data_path is None) == (dataset is None):
        raise DatasetError("give exactly one of --data-path (a folder) and --dataset (a Hub dataset)")
    if data_path is not None:
        samples, classes = scan_folder(data_path)
        read, bad = open_image, []
        if check_images:
            samples, bad = check_image_files(samples, workers)
    else:
        hub = open_hub_dataset(dataset, config, image_column, label_column, streaming)
        if streaming:
            return _streamed(hub)
        classes, train_split = hub.classes, "train" if "train" in hub.splits else next(iter(hub.splits))
        val_split = next((s for s in VALIDATION_SPLITS if s in hub.splits), None)
        read = RowImages(hub.splits[train_split], hub.image_column, f"{hub.name} {train_split}")
        samples = list(enumerate(hub.splits[train_split][hub.label_column]))
        bad = []
        if check_images:
            samples, bad = check_image_files(samples, workers, source=read.source, name=read.row_name)
        if val_split:
            val_read = RowImages(hub.splits[val_split], hub.image_column, f"{hub.name} {val_split}")
            val = list(enumerate(hub.splits[val_split][hub.label_column]))
            if check_images:
                val, val_bad = check_image_files(val, workers, source=val_read.source, name=val_read.row_name)
                bad += val_bad
    if report:
        report_bad_files(bad)
    empty = sorted(set(range(len(classes))) - {label for _, label in samples})
    if empty:
        raise DatasetError(f"class(es) {', '.join(classes[i] for i in empty)} have no readable image left "
                           f"(see the warning above)" + (": fix or remove those folders" if data_path else ""))
    if data_path is not None or not val_split:
        train, val = split_samples(samples, val_fraction, seed, classes)
        if not val:
            raise DatasetError("--val-fraction 0 leaves no validation images: use e.g. 0.2")
        val_read, val_split = read, None
    else:
        train = samples
    train_set = ImageFolderDataset(train, classes, read=read)
    val_set = ImageFolderDataset(val, classes, read=val_read)
    how = (f"stratified split, --val-fraction {val_fraction}, seed {seed}" if val_split is None
           else f"the dataset's `{val_split}` split")
    if data_path is not None:
        name = Path(data_path).resolve().name
        return TrainingData(
            train_set, val_set, classes, data_fingerprint(data_path, train, val),
            {"dataset_name": name, "dataset": f"`{name}`: {len(train)} training and {len(val)} validation images in "
                                              f"{len(classes)} classes ({how})"},
            partial(write_split, train=train, val=val, classes=classes, root=data_path))
    # a Hub commit pins the content; a save_to_disk folder's own fingerprint (in its state.json) does
    digest = hashlib.sha256((hub.revision or "".join(f"{s}\0{hub.splits[s]._fingerprint}\n" for s in hub.splits)).encode())
    for part, rows in (("train", train), ("val", val)):
        digest.update("".join(f"{part}\0{index}\0{label}\n" for index, label in rows).encode())
    return _from_hub(hub, train_set, val_set, digest.hexdigest(), {"split": train_split, "rows": [i for i, _ in train]},
                     {"split": val_split or train_split, "rows": [i for i, _ in val]},
                     f"{len(train)} training images (split `{train_split}`) and {len(val)} validation images ({how})")


def _from_hub(hub: HubDataset, train, val, sha256: str, train_record: dict, val_record: dict, counts: str,
              streams: dict | None = None) -> TrainingData:
    """A Hub dataset's :class:`TrainingData`: its fingerprint, its split.json record, and the card's fields (a Hub
    dataset by id and revision, with ``datasets:`` metadata; a local folder by its name only)."""
    names = {"dataset": hub.name, "revision": hub.revision, "config": hub.config}
    fingerprint = {**names, "train_images": len(train), "val_images": len(val), "sha256": sha256}
    record = {**names, "classes": hub.classes, "train": train_record, "val": val_record}
    where = (f"Hub dataset `{hub.name}`" + (f", configuration `{hub.config}`" if hub.config else "")
             + (f", revision `{hub.revision[:12]}`" if hub.revision else "")) if hub.on_hub else f"`{hub.name}`"
    card = {"dataset_name": hub.name, "dataset": f"{where}: {counts} in {len(hub.classes)} classes"}
    if hub.on_hub:
        card.update(datasets=[hub.name], dataset_revision=hub.revision, dataset_config=hub.config)
    return TrainingData(train, val, hub.classes, fingerprint, card, lambda path: path.write_text(json.dumps(record)),
                        streams or {})


def _streamed(hub: HubDataset) -> TrainingData:
    """Streaming: the training split read shard by shard, the dataset's own validation split."""
    val_split = next((s for s in VALIDATION_SPLITS if s in hub.splits), None)
    train_split = "train" if "train" in hub.splits else None
    if not (val_split and train_split):
        raise DatasetError(f"--streaming needs the dataset's own train and validation splits; {hub.name} has "
                           f"{', '.join(hub.splits)}: drop --streaming to download it and split it")
    sizes = {split: hub.splits[split].info.splits[split].num_examples if hub.splits[split].info.splits else None
             for split in (train_split, val_split)}
    if not all(sizes.values()):
        raise DatasetError(f"--streaming: {hub.name} does not say how many examples its splits hold (no dataset_info "
                           f"in its card), so an epoch has no length: drop --streaming")
    name = f"{hub.name} {train_split}"
    train = StreamedImages(hub.splits[train_split], hub.image_column, hub.label_column, name, sizes[train_split])
    val = StreamedImages(hub.splits[val_split], hub.image_column, hub.label_column, f"{hub.name} {val_split}",
                         sizes[val_split])
    return _from_hub(hub, train, val, hashlib.sha256(f"{train_split}\0{val_split}\0streaming".encode()).hexdigest(),
                     {"split": train_split, "streamed": True}, {"split": val_split, "streamed": True},
                     f"{sizes[train_split]} training images (split `{train_split}`, streamed) and "
                     f"{sizes[val_split]} validation images (split `{val_split}`)",
                     {"train": hub.splits[train_split], "image": hub.image_column, "label": hub.label_column})
