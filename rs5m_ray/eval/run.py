"""`rs5m eval`: load the model once, check each set against the training data, evaluate, write
`results.json`, `report.md` (Tables I/II) and plots under `output`."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from rs5m_ray.config import ConfigError, EvalConfig, EvalSetConfig, without_secrets
from rs5m_ray.eval import contamination, datasets
from rs5m_ray.eval.api import evaluate
from rs5m_ray.eval.embed import LocalEmbedder, RayEmbedder
from rs5m_ray.eval.report import markdown, plot
from rs5m_ray.models.clip import ClipModel, load_clip
from rs5m_ray.storage import Storage, join

SELO_PLOTS = 4  # heat maps drawn per SeLo set


def absolute(path: str | None) -> str | None:
    """Local paths made absolute: Ray actors read them from another working directory."""
    return os.path.abspath(path) if path and _local(path) else path


def open_set(s: EvalSetConfig, storage: Storage):
    s = dataclasses.replace(s, path=absolute(s.path), images=absolute(s.images))
    if s.task == "zero_shot":
        return datasets.read_image_folder(s.path, storage, s.name)
    if s.task == "selo":
        return datasets.read_air_slt(s.path, storage, s.name)
    if s.format == "csv":
        return datasets.read_retrieval_csv(s.path, _images(s), storage, s.encoding, s.name)
    if s.format == "precomp":
        return datasets.read_precomp(s.path, _images(s), s.split, storage, s.name)
    labelled = datasets.read_image_folder(_images(s), storage, s.name)
    found = datasets.class_matched_retrieval_set(labelled, s.path, s.split, storage=storage)
    found.name = s.name
    return found


def _images(s: EvalSetConfig) -> str:
    if not s.images:
        raise ConfigError(f"sets.{s.name}: retrieval format {s.format} needs `images`")
    return s.images


def label_of(cfg: EvalConfig) -> str:
    return cfg.label or f"{cfg.model.clip_model} ({cfg.model.clip_pretrained or 'random init'})"


def contamination_check(cfg: EvalConfig, clip: ClipModel, embedder, dataset, storage: Storage,
                        reference: contamination.Reference) -> dict:
    paths = dataset.paths
    hashes, errors = contamination.hash_images(paths, storage)
    vectors = None
    if cfg.contamination.embeddings and reference.vectors and not hasattr(dataset, "queries"):
        vectors = embedder.embed_images(paths).vectors
    found = contamination.check(paths, hashes, reference, cfg.contamination.hamming_radius, vectors,
                                cfg.contamination.cosine_threshold)
    found["unhashable"] = sum(e is not None for e in errors)
    return found


def run(cfg: EvalConfig, detector: dict | None = None) -> dict:
    if not cfg.sets:
        raise ConfigError("sets: no evaluation sets given")
    storage = Storage(cfg.storage)
    if cfg.model.clip_pretrained and os.path.exists(cfg.model.clip_pretrained):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 clip_pretrained=absolute(cfg.model.clip_pretrained)))
    if cfg.distributed:
        from rs5m_ray.ray_runtime import init_ray

        init_ray(cfg.ray)
    clip = load_clip(cfg.model, storage)
    embedder = RayEmbedder(cfg.model, cfg.storage, clip) if cfg.distributed else LocalEmbedder(
        clip, storage, cfg.model.forward_batch_size, cfg.model.decode_threads, cfg.model.decode_draft)
    c = cfg.contamination
    reference = None
    if c.train_shards or c.index_path:
        reference = contamination.Reference()
        if c.train_shards:
            from rs5m_ray.shards.reader import expand_urls

            reference = contamination.shard_reference(expand_urls(c.train_shards, storage), storage,
                                                      clip if c.embeddings else None)
        if c.index_path:
            extra = contamination.index_reference(c.index_path, storage)
            reference.ids += extra.ids
            reference.hashes += extra.hashes
    results, overlaps, failed = [], {}, {}
    for s in cfg.sets:
        try:
            dataset = open_set(s, storage)
        except (OSError, ValueError) as e:  # a missing or malformed set is reported; the others still run
            failed[s.name] = f"{type(e).__name__}: {e}"[:500]
            continue
        if reference is not None:
            found = contamination_check(cfg, clip, embedder, dataset, storage, reference)
            flagged = found.pop("flagged")
            found["excluded"] = bool(c.exclude and flagged.any())
            overlaps[s.name] = found
            if found["excluded"]:
                dataset = _without(dataset, flagged)
        results.append(evaluate(clip, dataset, s.protocol, embedder=embedder, storage=storage,
                                class_names=s.class_names, keep_maps=SELO_PLOTS if cfg.plots else 0))
    return write(cfg, results, overlaps, storage, detector, failed)


def _without(dataset, flagged: np.ndarray):
    if isinstance(dataset, datasets.SeLoSet):
        bad = {p for p, f in zip(dataset.paths, flagged) if f}
        return datasets.SeLoSet(dataset.name, [q for q in dataset.queries if q.image not in bad])
    return dataset.subset(~flagged)


def write(cfg: EvalConfig, results: list[dict], overlaps: dict, storage: Storage,
          detector: dict | None = None, failed: dict | None = None) -> dict:
    label = label_of(cfg)
    plots = []
    if cfg.plots:
        with tempfile.TemporaryDirectory() as tmp:  # drawn locally, then stored beside the results (or on S3)
            for r in results:
                for path in plot(r, tmp):
                    target = join(cfg.output, "plots", os.path.basename(path))
                    with open(path, "rb") as f:
                        storage.write_atomic(target, f.read())
                    plots.append(target)
    report = {"label": label, "config": without_secrets(cfg),
              "results": [{k: v for k, v in r.items() if k != "maps"} for r in results],
              "contamination": overlaps, "detector": detector, "failed_sets": failed or {}, "plots": plots}
    storage.makedirs(cfg.output)
    storage.write_atomic(join(cfg.output, "results.json"), json.dumps(report, indent=1, default=float).encode())
    table = markdown(label, results, overlaps, detector)
    if failed:
        table += "\nSets that could not be read: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) + "\n"
    storage.write_atomic(join(cfg.output, "report.md"), table.encode())
    return report | {"markdown": table}


def _local(path: str) -> bool:
    return "://" not in path


def main(args) -> int:
    """CLI entry: a config's sets, and/or a detector on labelled folders; prints the tables."""
    from rs5m_ray.config import load_config

    overrides = {"output": args.out} if args.out else {}
    cfg = load_config(args.config, overrides, cls=EvalConfig)
    if not args.detector and not cfg.sets:
        raise ConfigError("nothing to evaluate: give --config with sets, or --detector with --positives/--negatives")
    detector = None
    if args.detector:
        if not (args.positives and args.negatives):
            raise ConfigError("--detector needs --positives and --negatives")
        from rs5m_ray.eval.detector import evaluate_detector

        storage = Storage(cfg.storage)
        detector = evaluate_detector(args.detector, datasets.read_detector_folders(
            args.positives, args.negatives, storage), cfg.model, storage)
    report = run(cfg, detector) if cfg.sets else write(cfg, [], {}, Storage(cfg.storage), detector)
    print(report["markdown"])
    print(f"results: {join(cfg.output, 'results.json')}, {join(cfg.output, 'report.md')}")
    return 0
