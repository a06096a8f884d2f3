"""`evaluate(model, dataset, protocol)`: the one entry point of `rs5m eval` and of training's
periodic evaluation. Importing it starts nothing (no Ray, no model load)."""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from rs5m_ray.eval import selo
from rs5m_ray.eval.datasets import ClassificationSet, RetrievalSet, SeLoSet
from rs5m_ray.eval.embed import Embedded, LocalEmbedder, embed_texts
from rs5m_ray.eval.protocols import Protocol, get_protocol
from rs5m_ray.eval.retrieval import retrieval
from rs5m_ray.eval.zero_shot import zero_shot
from rs5m_ray.models.clip import ClipModel
from rs5m_ray.storage import Storage

EvalSet = Union[ClassificationSet, RetrievalSet, SeLoSet]
TASKS = {ClassificationSet: "zero_shot", RetrievalSet: "retrieval", SeLoSet: "selo"}


def clip_of(module: torch.nn.Module, tokenizer: Callable, name: str = "model",
            device: torch.device | str | None = None) -> ClipModel:
    """A `ClipModel` around an open_clip module in memory (e.g. the training loop's, unwrapped from DDP),
    fed by the shard reader's fast preprocessing (the module must have open_clip's eval transform)."""
    param = next(module.parameters())
    clip = ClipModel(name, module, None, tokenizer, torch.device(device) if device else param.device, param.dtype)
    if clip.eval_transform is None:
        raise ValueError(f"{name}: no standard open_clip eval transform (visual.preprocess_cfg); load it with load_clip")
    return clip


def evaluate(model: ClipModel, dataset: EvalSet, protocol: Protocol | str | None = None, *,
             embedder=None, storage: Storage | None = None, class_names: dict[str, str] | None = None,
             keep_maps: int = 0) -> dict:
    """Metrics of `model` on `dataset` under `protocol` (its task's RS5M protocol by default).

    `embedder` runs the image pass (default: in this process; `RayEmbedder` for Ray actor pools).
    Images that cannot be read or decoded are left out and listed under "unreadable".
    `class_names` overrides zero-shot class names per folder. `keep_maps`: the uint8 SeLo probability
    maps of the first N queries, under "maps" (for plots; not JSON).
    """
    task = TASKS.get(type(dataset))
    if task is None:
        raise TypeError(f"cannot evaluate a {type(dataset).__name__}")
    protocol = get_protocol(protocol, task)
    was_training = model.model.training
    model.model.eval()
    try:
        maps: list = []
        if task == "selo":
            metrics, unreadable, maps = _selo(model, dataset, protocol, storage or Storage(), keep_maps)
        else:
            embedded = (embedder or LocalEmbedder(model, storage)).embed_images(dataset.paths)
            metrics = _task(model, dataset, protocol, embedded, class_names)
            unreadable = [{"image": p, "error": e} for p, e in zip(dataset.paths, embedded.errors) if e]
    finally:
        model.model.train(was_training)
    result = {"task": task, "dataset": dataset.name, "model": model.name, "protocol": protocol.describe(),
              "metrics": metrics, "unreadable": unreadable}
    return result | ({"maps": maps} if maps else {})


def _task(model: ClipModel, dataset: EvalSet, protocol: Protocol, embedded: Embedded,
          class_names: dict[str, str] | None) -> dict:
    ok = embedded.ok
    if isinstance(dataset, ClassificationSet):
        names = [protocol.class_name(f, class_names) for f in dataset.folders]
        out = zero_shot(embedded.vectors[ok], dataset.labels[ok], model, names, protocol)
        out["folders"] = list(dataset.folders)
        return out
    subset = dataset.subset(ok) if not ok.all() else dataset
    texts = embed_texts(model, subset.captions).numpy()
    return retrieval(embedded.vectors[ok], texts, subset.caption_image, protocol)


def _selo(model: ClipModel, dataset: SeLoSet, protocol, storage: Storage, keep_maps: int) -> tuple[dict, list, list]:
    per_query, maps, unreadable = [], [], []
    cache: dict[str, tuple] = {}  # one scene's crop embeddings at a time: queries are taken scene by scene
    for i in sorted(range(len(dataset.queries)), key=lambda j: dataset.queries[j].image):
        q = dataset.queries[i]
        if q.image not in cache:
            try:
                image = selo.decode_bgr(storage.read_bytes(q.image))
                wins, crops = selo.crops(image, protocol)
                pixels, errors = model.decode_images(crops, draft=False)
                if any(errors):
                    raise ValueError(next(e for e in errors if e))
                cache = {q.image: (image.shape[:2], wins, model.encode_images(pixels).numpy())}
            except Exception as e:  # noqa: BLE001 - one unreadable scene must not stop the evaluation
                unreadable.append({"image": q.image, "error": f"{type(e).__name__}: {e}"[:300]})
                cache = {q.image: None}
        if cache[q.image] is None:
            continue
        (h, w), wins, vectors = cache[q.image]
        text = embed_texts(model, [q.caption]).numpy()[0]
        prob_u8 = selo.probability_map(selo.heat_map(h, w, wins, vectors @ text), protocol.blur_kernel)
        m = selo.slm_metrics(prob_u8 / 255.0, q.regions)
        per_query.append({"query": i, "image": q.image, "caption": q.caption, **m})
        if len(maps) < keep_maps:
            maps.append({"image": q.image, "caption": q.caption, "prob": prob_u8, "regions": q.regions})
    keys = ("Rsu", "Ras", "Rda", "Rmi")
    mean = {k: float(np.mean([m[k] for m in per_query])) if per_query else None for k in keys}
    return {**mean, "queries": len(per_query), "per_query": per_query}, unreadable, maps
