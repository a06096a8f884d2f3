"""Evaluation sets in their published formats: ImageFolder classification sets, RS5M's retrieval
CSVs and the `*_precomp` caption files, AIR-SLT's SeLo annotations, labelled folders for the
detector. Images stay paths (local or s3://) until an embedding pass reads them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np

from rs5m_ray.storage import Storage, join

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ClassificationSet:
    """ImageFolder: class = sub-folder, classes in sorted folder order (torchvision's), as RS5M loads AID."""

    name: str
    paths: list[str]
    labels: np.ndarray  # int, index into folders
    folders: list[str]

    def subset(self, keep: np.ndarray) -> "ClassificationSet":
        return ClassificationSet(self.name, [p for p, k in zip(self.paths, keep) if k], self.labels[keep], self.folders)


@dataclass
class RetrievalSet:
    """Unique images, each with its captions (caption_image[j] = index of caption j's image)."""

    name: str
    paths: list[str]
    captions: list[str]
    caption_image: np.ndarray

    def subset(self, keep: np.ndarray) -> "RetrievalSet":
        """Without the images where `keep` is False, and without their captions."""
        new_index = np.cumsum(keep) - 1
        kept_caption = keep[self.caption_image]
        return RetrievalSet(self.name, [p for p, k in zip(self.paths, keep) if k],
                            [c for c, k in zip(self.captions, kept_caption) if k],
                            new_index[self.caption_image[kept_caption]])


@dataclass
class SeLoQuery:
    image: str
    caption: str
    regions: list[list[tuple[float, float]]]  # GT polygons, (x, y) vertices


@dataclass
class SeLoSet:
    name: str
    queries: list[SeLoQuery] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return sorted({q.image for q in self.queries})


@dataclass
class DetectorSet:
    """Labelled folders for the RS detector: 1 = remote sensing, 0 = not."""

    name: str
    paths: list[str]
    labels: np.ndarray


def _images_below(root: str, storage: Storage) -> list[str]:
    return sorted(p for p in storage.glob(join(root, "**")) if p.lower().endswith(IMAGE_EXTENSIONS))


def read_image_folder(root: str, storage: Storage | None = None, name: str | None = None) -> ClassificationSet:
    storage = storage or Storage()
    root = root.rstrip("/")
    paths, labels, folders = [], [], []
    for path in _images_below(root, storage):
        rel = path[len(root):].lstrip("/")
        if "/" not in rel:
            continue  # a file beside the class folders belongs to no class
        folder = rel.split("/", 1)[0]
        if folder not in folders:
            folders.append(folder)
        paths.append(path)
        labels.append(folder)
    folders.sort()
    if not paths:
        raise ValueError(f"{root}: no images in class sub-folders (ImageFolder layout: <root>/<class>/<image>)")
    index = {f: i for i, f in enumerate(folders)}
    return ClassificationSet(name or os.path.basename(root), paths, np.array([index[f] for f in labels]), folders)


def read_detector_folders(positives: str, negatives: str, storage: Storage | None = None,
                          name: str = "detector") -> DetectorSet:
    storage = storage or Storage()
    pos, neg = _images_below(positives, storage), _images_below(negatives, storage)
    if not pos or not neg:
        raise ValueError(f"need images in both folders: {len(pos)} in {positives}, {len(neg)} in {negatives}")
    return DetectorSet(name, pos + neg, np.array([1] * len(pos) + [0] * len(neg)))


def grouped(name: str, image_names: list[str], captions: list[str], images_dir: str) -> RetrievalSet:
    """One entry per unique image (first-appearance order) holding all its captions."""
    order: dict[str, int] = {}
    caption_image = [order.setdefault(n, len(order)) for n in image_names]
    return RetrievalSet(name, [join(images_dir, n) for n in order], list(captions), np.array(caption_image))


def read_retrieval_csv(path: str, images_dir: str, storage: Storage | None = None, encoding: str | None = None,
                       name: str | None = None) -> RetrievalSet:
    """RS5M's retrieval CSV (columns `filename`, `title`). RS5M reads the RSICD file as gb18030
    (its name contains "rsicd"); `encoding` overrides, default utf-8 otherwise."""
    storage = storage or Storage()
    encoding = encoding or ("gb18030" if "rsicd" in os.path.basename(path).lower() else "utf-8")
    text = storage.read_bytes(path).decode(encoding)
    rows = list(csv.DictReader(io.StringIO(text)))
    missing = {"filename", "title"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (RS5M's retrieval CSV has filename, title)")
    return grouped(name or os.path.basename(path).rsplit(".", 1)[0], [r["filename"] for r in rows],
                   [r["title"] for r in rows], images_dir)


def read_precomp(directory: str, images_dir: str, split: str = "test", storage: Storage | None = None,
                 name: str | None = None) -> RetrievalSet:
    """The `*_precomp` format (AMFMN, RSICD/RSITMD/UCM/Sydney): `<split>_filename.txt`, one image per line,
    and `<split>_caps.txt`, where image line k owns caption lines n*k .. n*k+n-1 (n = 5 in all four sets)."""
    storage = storage or Storage()
    files = _lines(storage.read_bytes(join(directory, f"{split}_filename.txt")))
    caps = _lines(storage.read_bytes(join(directory, f"{split}_caps.txt")))
    if not files or len(caps) % len(files):
        raise ValueError(f"{directory}: {len(caps)} captions do not divide evenly over {len(files)} images")
    per = len(caps) // len(files)
    return grouped(name or f"{os.path.basename(directory.rstrip('/'))}-{split}",
                   [f for f in files for _ in range(per)], caps, images_dir)


def _lines(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def read_air_slt(root: str, storage: Storage | None = None, name: str = "AIR-SLT") -> SeLoSet:
    """AIR-SLT: `annotations/anno.json` (a list of {jpg_name, caption, points}; points = GT polygons of
    [x, y] vertices) and the images in `imgs/`."""
    storage = storage or Storage()
    entries = json.loads(storage.read_bytes(join(root, "annotations", "anno.json")))
    queries = []
    for i, e in enumerate(entries):
        missing = {"jpg_name", "caption", "points"} - set(e)
        if missing:
            raise ValueError(f"{root} annotation {i}: missing {sorted(missing)}")
        regions = [[(float(x), float(y)) for x, y in polygon] for polygon in e["points"]]
        if not regions or any(len(r) < 3 for r in regions):
            raise ValueError(f"{root} annotation {i} ({e['jpg_name']}): every region needs >= 3 vertices")
        queries.append(SeLoQuery(join(root, "imgs", e["jpg_name"]), e["caption"], regions))
    return SeLoSet(name, queries)


def caption_class(file_name: str) -> str:
    """RSICD names its images <class>_<n>.jpg ("denseresidential_12.jpg" -> "denseresidential")."""
    return re.sub(r"_?\d*\.\w+$", "", os.path.basename(file_name)).lower()


def class_matched_captions(folders: list[str], precomp_dir: str, split: str = "train",
                           storage: Storage | None = None) -> dict[str, list[list[str]]]:
    """For each ImageFolder class, the caption groups (one per captioned image) of the same class in a
    precomp caption set whose file names carry the class (RSICD: AID's 30 classes, same names lower-cased)."""
    storage = storage or Storage()
    files = _lines(storage.read_bytes(join(precomp_dir, f"{split}_filename.txt")))
    caps = _lines(storage.read_bytes(join(precomp_dir, f"{split}_caps.txt")))
    per = len(caps) // len(files)
    by_class: dict[str, list[list[str]]] = {}
    for k, f in enumerate(files):
        by_class.setdefault(caption_class(f), []).append(caps[per * k:per * (k + 1)])
    matched = {folder: by_class.get(folder.lower(), []) for folder in folders}
    missing = [f for f, groups in matched.items() if not groups]
    if missing:
        raise ValueError(f"no captions of class(es) {missing} in {precomp_dir}")
    return matched


def class_matched_retrieval_set(images: ClassificationSet, precomp_dir: str, split: str = "train",
                                seed: int = 0, storage: Storage | None = None) -> RetrievalSet:
    """A retrieval set from labelled images and captions of OTHER images of the same class: each image
    gets the captions of one captioned image of its class (distinct ones while they last, seeded). Only
    class-level text: a perfect class-level model finds the right image among its class's images by chance."""
    matched = class_matched_captions(images.folders, precomp_dir, split, storage)
    rng = random.Random(seed)
    pools = {f: rng.sample(groups, len(groups)) for f, groups in matched.items()}
    used = {f: 0 for f in matched}
    names, captions = [], []
    for path, label in zip(images.paths, images.labels):
        folder = images.folders[label]
        group = pools[folder][used[folder] % len(pools[folder])]
        used[folder] += 1
        names += [path] * len(group)
        captions += group
    return grouped(f"{images.name}+captions", names, captions, "")
