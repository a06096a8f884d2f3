"""Evaluation protocols: named, versioned objects, so every number says what produced it.

Published zero-shot and retrieval numbers disagree mostly by protocol (notes §5): the same
GeoRSCLIP ViT-B/32 scores 73.72 on AID under RS5M's 105 templates and 69.75 under
SkyScript's; "mR" is the mean of 6 recalls (RS5M, RemoteCLIP) or of each direction
(SkyScript). A protocol fixes every such choice; `protocol.id` (name-vN) goes into every
result. A changed rule is a new version, never an edit of a published one.

To add one (e.g. SkyScript's templates, whose exact list is not in this project's notes):
`register(ZeroShotProtocol("skyscript", 1, templates=(...), averaging="normalized"))`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Union

from rs5m_ray.models.prompts import CLIP_EUROSAT_TEMPLATES, CLIP_RESISC45_TEMPLATES, RS5M_ZERO_SHOT_TEMPLATES


def rs5m_class_name(folder: str) -> str:
    """RS5M's rule (inference_tool.py): "_" and "/" -> space, lower case; CamelCase is NOT split,
    so AID's "BaseballField" reads "baseballfield"."""
    return folder.replace("_", " ").replace("/", " ").lower()


def split_camel_class_name(folder: str) -> str:
    """"BaseballField" -> "baseball field" (then RS5M's rule): what a human would write."""
    return rs5m_class_name(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder))


CLASS_NAME_RULES: dict[str, Callable[[str], str]] = {"rs5m": rs5m_class_name, "split_camel": split_camel_class_name}
AVERAGING = ("raw", "normalized")
TIES = ("pessimistic", "optimistic")


@dataclass(frozen=True)
class ZeroShotProtocol:
    """Class names from folder names by `class_name_rule` (a class-name map overrides them), one
    prompt per template, the class vector = normalised mean of the prompt embeddings: `raw`
    (RS5M: un-normalised text features averaged) or `normalized` (CLIP, open_clip, CLIP_benchmark:
    each prompt embedding L2-normalised first). Logits = logit_scale * cos."""

    name: str
    version: int
    templates: tuple[str, ...]
    averaging: str = "raw"
    class_name_rule: str = "rs5m"
    logit_scale: float = 100.0
    top_k: tuple[int, ...] = (1, 5)
    task: str = field(default="zero_shot", init=False)

    def __post_init__(self):
        if self.averaging not in AVERAGING:
            raise ValueError(f"averaging {self.averaging!r}: expected one of {AVERAGING}")
        if self.class_name_rule not in CLASS_NAME_RULES:
            raise ValueError(f"class_name_rule {self.class_name_rule!r}: expected one of {sorted(CLASS_NAME_RULES)}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"{self.name}: every template needs exactly one '{{}}'")

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def class_name(self, folder: str, overrides: dict[str, str] | None = None) -> str:
        if overrides and folder in overrides:
            return overrides[folder]
        return CLASS_NAME_RULES[self.class_name_rule](folder)

    def prompts(self, class_name: str) -> list[str]:
        return [t.replace("{}", class_name) for t in self.templates]

    def describe(self) -> dict:
        return {"id": self.id, "task": self.task, "templates": len(self.templates), "averaging": self.averaging,
                "class_name_rule": self.class_name_rule, "logit_scale": self.logit_scale, "top_k": list(self.top_k)}


@dataclass(frozen=True)
class RetrievalProtocol:
    """R@K both ways as in CLIP_benchmark (RS5M's retrieval code is a copy of it): an image counts
    as found for image->text if ANY of its captions is in the top K; a caption for text->image if its
    image is. mR = mean of the 2 x len(ks) recalls (RS5M); the per-direction means are reported too
    (SkyScript's "mean recall"). Ties, which CLIP_benchmark leaves to torch.topk's order: `pessimistic`
    ranks every wrong item tied with the best right one first; the report counts the queries a tie decided."""

    name: str
    version: int
    ks: tuple[int, ...] = (1, 5, 10)
    ties: str = "pessimistic"
    task: str = field(default="retrieval", init=False)

    def __post_init__(self):
        if self.ties not in TIES:
            raise ValueError(f"ties {self.ties!r}: expected one of {TIES}")

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def describe(self) -> dict:
        return {"id": self.id, "task": self.task, "ks": list(self.ks), "ties": self.ties,
                "mean_recall": f"mean of the {2 * len(self.ks)} recalls"}


@dataclass(frozen=True)
class SeLoProtocol:
    """Semantic localization (notes §5.3, Yuan et al.'s SLM metric as RS5M runs it): windows of each
    size on a grid of stride = size and on the grid shifted by half a size, clamped to the border;
    crops resized to `crop_size` (cubic) then the model's eval preprocessing; a pixel's heat is the mean
    cosine of the windows covering it; min-max to uint8, median blur `blur_kernel`."""

    name: str
    version: int
    window_sizes: tuple[int, ...] = (256, 512, 768)
    crop_size: int = 256
    blur_kernel: int = 251
    task: str = field(default="selo", init=False)

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    def describe(self) -> dict:
        return {"id": self.id, "task": self.task, "window_sizes": list(self.window_sizes),
                "crop_size": self.crop_size, "blur_kernel": self.blur_kernel,
                "metrics": "Rsu, Ras, Rda, Rmi = 0.4 Rsu + 0.35 (1 - Ras) + 0.25 Rda (SLM)"}


Protocol = Union[ZeroShotProtocol, RetrievalProtocol, SeLoProtocol]

RS5M_ZERO_SHOT = ZeroShotProtocol("rs5m", 1, RS5M_ZERO_SHOT_TEMPLATES, averaging="raw")
CLIP_RESISC45 = ZeroShotProtocol("clip-resisc45", 1, CLIP_RESISC45_TEMPLATES, averaging="normalized")
CLIP_EUROSAT = ZeroShotProtocol("clip-eurosat", 1, CLIP_EUROSAT_TEMPLATES, averaging="normalized")
RS5M_RETRIEVAL = RetrievalProtocol("rs5m-retrieval", 1)
RS5M_SELO = SeLoProtocol("rs5m-selo", 1)

PROTOCOLS: dict[str, Protocol] = {}
DEFAULTS = {"zero_shot": RS5M_ZERO_SHOT, "retrieval": RS5M_RETRIEVAL, "selo": RS5M_SELO}


def register(protocol: Protocol) -> Protocol:
    known = PROTOCOLS.get(protocol.id)
    if known is not None and known != protocol:
        raise ValueError(f"protocol {protocol.id} is already defined differently: publish a new version")
    PROTOCOLS[protocol.id] = protocol
    return protocol


for _p in (RS5M_ZERO_SHOT, CLIP_RESISC45, CLIP_EUROSAT, RS5M_RETRIEVAL, RS5M_SELO):
    register(_p)


def get_protocol(name: str | Protocol | None, task: str) -> Protocol:
    """A protocol by id ("rs5m-v1"), by name (its latest version), or the task's default (RS5M's)."""
    if name is None:
        return DEFAULTS[task]
    if not isinstance(name, str):
        protocol = name
    elif name in PROTOCOLS:
        protocol = PROTOCOLS[name]
    else:
        versions = [p for p in PROTOCOLS.values() if p.name == name]
        if not versions:
            raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
        protocol = max(versions, key=lambda p: p.version)
    if protocol.task != task:
        raise ValueError(f"protocol {protocol.id} is for {protocol.task}, not {task}")
    return protocol
