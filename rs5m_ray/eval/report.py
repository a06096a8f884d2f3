"""Evaluation outputs: results JSON, markdown tables shaped like the paper's Tables I and II (method
rows x metric columns, each number's protocol named), and plots (confusion matrix, per-class bars,
SeLo heat maps over the image)."""
from __future__ import annotations

import os

import numpy as np

from rs5m_ray.plots import png_bytes, pyplot


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table_one(label: str, results: list[dict]) -> str:
    """Zero-shot top-1 per set and SeLo (Table I)."""
    zs = [r for r in results if r["task"] == "zero_shot"]
    sl = [r for r in results if r["task"] == "selo"]
    if not zs and not sl:
        return ""
    head = [f"{r['dataset']} top-1 ({r['protocol']['id']})" for r in zs]
    for r in sl:
        head += [f"{r['dataset']} {k}{arrow} ({r['protocol']['id']})"
                 for k, arrow in (("Rsu", "↑"), ("Ras", "↓"), ("Rda", "↑"), ("Rmi", "↑"))]
    row = [_fmt(r["metrics"].get("top1")) for r in zs]
    for r in sl:
        row += [_fmt(r["metrics"][k], 4) for k in ("Rsu", "Ras", "Rda", "Rmi")]
    return _markdown(["method"] + head, [[label] + row])


def table_two(label: str, results: list[dict]) -> str:
    """Retrieval (Table II): I2T R@1/5/10 | T2I R@1/5/10 | mR per set, plus the per-direction means."""
    rt = [r for r in results if r["task"] == "retrieval"]
    if not rt:
        return ""
    head, row = [], []
    for r in rt:
        m = r["metrics"]
        head += [f"{r['dataset']} I2T R@1/5/10", "T2I R@1/5/10", f"mR ({r['protocol']['id']})",
                 "mR I2T / T2I"]
        row += ["/".join(_fmt(v) for v in m["image_to_text"].values()),
                "/".join(_fmt(v) for v in m["text_to_image"].values()), _fmt(m["mR"]),
                f"{_fmt(m['mR_image_to_text'])} / {_fmt(m['mR_text_to_image'])}"]
    return _markdown(["method"] + head, [[label] + row])


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(label: str, results: list[dict], contamination: dict | None = None,
             detector: dict | None = None) -> str:
    parts = [f"# Evaluation of {label}"]
    one, two = table_one(label, results), table_two(label, results)
    if one:
        parts += ["## Zero-shot classification (top-1 %) and semantic localization", one]
    if two:
        parts += ["## Cross-modal retrieval (%)", two]
    if detector:
        m = detector["metrics"]
        parts += ["## RS detector", _markdown(["detector", "accuracy", "ROC-AUC", "images"],
                                              [[detector["checkpoint"], _fmt(100 * m["accuracy"]),
                                                _fmt(m["roc_auc"], 4), str(m["n"])]])]
    if contamination:
        rows = [[name, str(c["images"]), str(c["exact"]), str(c["near"]), str(c["embedding_only"]),
                 c["embedding_check"].split(":")[0].split(" (")[0], "excluded" if c.get("excluded") else "kept"]
                for name, c in contamination.items()]
        parts += ["## Contamination (eval images found in the training data)",
                  _markdown(["set", "images", "exact (pHash 0)", "near (pHash <= radius)", "embedding only",
                             "embedding check", "overlaps"], rows)]
    unreadable = {r["dataset"]: len(r["unreadable"]) for r in results if r["unreadable"]}
    if unreadable:
        parts.append(f"Unreadable images left out: {unreadable} (listed in results.json).")
    return "\n\n".join(parts) + "\n"


def plot(result: dict, out_dir: str) -> list[str]:
    """PNG plots of one result; their paths."""
    plt = pyplot()

    os.makedirs(out_dir, exist_ok=True)
    name = result["dataset"]
    written = []
    if result["task"] == "zero_shot":
        m = result["metrics"]
        confusion = np.array(m["confusion"], dtype=float)
        rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        n = len(m["classes"])
        fig, ax = plt.subplots(figsize=(max(6, 0.32 * n + 3), max(5, 0.32 * n + 2)))
        im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(n), m["classes"], rotation=90, fontsize=7)
        ax.set_yticks(range(n), m["classes"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: confusion (row-normalised), top-1 {_fmt(m.get('top1'))}%, {result['protocol']['id']}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        written.append(_save(fig, out_dir, f"{name}-confusion.png"))
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * n + 2), 4))
        acc = [v or 0.0 for v in m["per_class_top1"].values()]
        ax.bar(range(n), acc, color="tab:blue")
        ax.axhline(m["chance"], color="tab:red", linestyle="--", label=f"chance {m['chance']:.1f}%")
        ax.set_xticks(range(n), m["classes"], rotation=90, fontsize=7)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title(f"{name}: per-class accuracy ({result['model']})")
        fig.tight_layout()
        written.append(_save(fig, out_dir, f"{name}-per-class.png"))
    for i, mp in enumerate(result.get("maps", [])):
        written.append(_selo_plot(plt, mp, result["metrics"]["per_query"][i], out_dir, f"{name}-selo-{i}.png"))
    return written


def _selo_plot(plt, mp: dict, metrics: dict, out_dir: str, file: str) -> str:
    from PIL import Image

    with Image.open(mp["image"]) as img:
        rgb = np.asarray(img.convert("RGB"))
    fig, ax = plt.subplots(figsize=(6, 6 * rgb.shape[0] / rgb.shape[1]))
    ax.imshow(rgb)
    ax.imshow(mp["prob"], cmap="jet", alpha=0.35, vmin=0, vmax=255)
    for region in mp["regions"]:
        pts = np.array(region + region[:1])
        ax.plot(pts[:, 0], pts[:, 1], color="white", linewidth=1.5)
    ax.set_title(f"\"{mp['caption'][:60]}\"\nRsu {metrics['Rsu']:.3f} Ras {metrics['Ras']:.3f} "
                 f"Rda {metrics['Rda']:.3f} Rmi {metrics['Rmi']:.3f}", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return _save(fig, out_dir, file)


def _save(fig, out_dir: str, file: str) -> str:
    path = os.path.join(out_dir, file)
    with open(path, "wb") as f:
        f.write(png_bytes(fig, dpi=110, tight=False))
    return path
