"""Semantic localization (SeLo) on AIR-SLT: probability maps from sliding windows and Yuan et al.'s
SLM metrics Rsu, Ras, Rda, Rmi (notes §5.3), as RS5M's inference_tool.py computes them.

Map: for each window size s, windows on the grid of stride s from 0 and from s/2, both axes alike,
a window past the border moved back inside it (identical windows counted once, as the reference's
file names make them); each crop resized to 256x256 (cubic), JPEG-encoded as the reference writes it,
then the model's eval preprocessing; a pixel's heat is the mean cosine of its windows; min-max to
uint8 (truncated), median blur 251. One difference: the reference also saves that map as a JPEG
and reads it back before scoring; we score the uint8 map itself (no second lossy round trip).

Metrics, with the SLM code's integer conventions (region centre = int(mean vertex), radius =
int(1.5 x mean vertex distance); attention centres from the uint8 map box-filtered 5 times 50x50,
maxima of a 1000-px maximum filter, 8-connected region centroids, kept where prob >= 0.5):
- Rsu = 1 - exp(-0.707 * [S_in / (S - S_in + 1e-7)] * [(HW - |mask|) / |mask|])
- Ras = (e^{3x} - 1) / (e^3 - 1), x = mean over regions of offset / r; offset = mean distance to the
  attention centres within r, else r
- Rda = mean over regions of n (n <= 1 centres within r) or 0.5 (1 - mean spread / r) + e^{-0.5 (n + 2)}
- Rmi = 0.4 Rsu + 0.35 (1 - Ras) + 0.25 Rda
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from rs5m_ray.eval.protocols import SeLoProtocol

RSU_BETA, RSU_EPS = 0.707, 1e-7
RADIUS_FACTOR = 1.5
BOX_PASSES, BOX_SIZE, MAX_FILTER_SIZE, MIN_PEAK_PROB = 5, 50, 1000, 0.5
RAS_BETA, RDA_ETA = 3.0, 0.5
RMI_WEIGHTS = (0.4, 0.35, 0.25)
CROP_JPEG_QUALITY = 95  # cv2.imwrite's default, what the reference writes its crops with

Window = tuple[int, int, int, int]  # row start, row end, col start, col end


def _axis_windows(length: int, size: int, offset: int) -> list[tuple[int, int]]:
    out = []
    for start in range(offset, length, size):
        end = start + size
        if end >= length:
            start, end = max(0, length - size), length
        out.append((start, end))
    return out


def windows(height: int, width: int, sizes: tuple[int, ...]) -> list[Window]:
    """All distinct windows of every size on its two grids (offset 0 and size/2 on both axes)."""
    found: set[Window] = set()
    for size in sizes:
        for offset in (0, size // 2):
            rows, cols = _axis_windows(height, size, offset), _axis_windows(width, size, offset)
            found.update((r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols)
    return sorted(found)


def heat_map(height: int, width: int, wins: list[Window], scores: np.ndarray) -> np.ndarray:
    """Per pixel: the mean score of the windows covering it."""
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for (r0, r1, c0, c1), s in zip(wins, scores):
        total[r0:r1, c0:c1] += s
        count[r0:r1, c0:c1] += 1
    return total / np.maximum(count, 1)


def probability_map(heat: np.ndarray, blur_kernel: int) -> np.ndarray:
    """uint8 map: min-max scaled, truncated to 0..255, median-blurred. A flat map is all zeros."""
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    gray = np.uint8(255 * scaled)
    return cv2.medianBlur(gray, blur_kernel) if blur_kernel > 1 else gray


def region_mask(shape: tuple[int, int], regions: list[list[tuple[float, float]]]) -> np.ndarray:
    mask = np.zeros(shape)
    cv2.fillPoly(mask, [np.array(r, np.int32) for r in regions], 1)
    return mask


def centre_and_radius(region: list[tuple[float, float]]) -> tuple[int, int, int]:
    pts = np.asarray(region, dtype=float)
    x, y = int(pts[:, 0].sum() / len(pts)), int(pts[:, 1].sum() / len(pts))
    return x, y, int(np.mean(np.linalg.norm(pts - [x, y], axis=1)) * RADIUS_FACTOR)


def attention_centres(prob: np.ndarray) -> list[tuple[int, int]]:
    """(x, y) centres of the map's attention peaks, most probable first."""
    gray = np.asarray(prob * 255.0, dtype=np.uint8)
    for _ in range(BOX_PASSES):
        gray = cv2.boxFilter(gray, ddepth=-1, ksize=(BOX_SIZE, BOX_SIZE))
    peaks = (gray == ndimage.maximum_filter(gray, size=MAX_FILTER_SIZE)) & (gray > 0)
    labels, n = ndimage.label(peaks, structure=np.ones((3, 3)))
    centroids = ndimage.center_of_mass(peaks, labels, range(1, n + 1)) if n else []
    centres = [(int(c), int(r)) for r, c in centroids]
    centres.sort(key=lambda p: prob[p[1], p[0]], reverse=True)
    return [p for p in centres if prob[p[1], p[0]] >= MIN_PEAK_PROB]


def rsu(prob: np.ndarray, mask: np.ndarray) -> float:
    inside, total, area = float((prob * mask).sum()), float(prob.sum()), float(mask.sum())
    if area == 0:
        raise ValueError("the ground-truth regions cover no pixel of the map")
    left = inside / (total - inside + RSU_EPS)
    right = (mask.size - area) / area
    return float(1 - math.exp(-RSU_BETA * left * right))


def _within(centre: tuple[int, int, int], points: list[tuple[int, int]]) -> np.ndarray:
    x, y, r = centre
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    d = np.linalg.norm(pts - [x, y], axis=1)
    return pts[d <= r]


def ras(regions: list[list[tuple[float, float]]], centres: list[tuple[int, int]]) -> float:
    circles = [centre_and_radius(r) for r in regions]
    if not centres:
        x = 1.0
    else:
        offsets = []
        for cx, cy, r in circles:
            inside = _within((cx, cy, r), centres)
            offsets.append(np.linalg.norm(inside - [cx, cy], axis=1).mean() / r if len(inside) else 1.0)
        x = float(np.mean(offsets))
    return float((math.exp(RAS_BETA * x) - 1) / (math.exp(RAS_BETA) - 1))


def rda(regions: list[list[tuple[float, float]]], centres: list[tuple[int, int]]) -> float:
    values = []
    for cx, cy, r in (centre_and_radius(reg) for reg in regions):
        inside = _within((cx, cy, r), centres)
        n = len(inside)
        if n <= 1:
            values.append(float(n))
            continue
        spread = np.linalg.norm(inside - inside.mean(axis=0), axis=1).mean() / r
        values.append(0.5 * (1 - spread) + math.exp(-RDA_ETA * (n + 2)))
    return float(np.mean(values))


def rmi(rsu_value: float, ras_value: float, rda_value: float) -> float:
    w_su, w_as, w_da = RMI_WEIGHTS
    return w_su * rsu_value + w_as * (1 - ras_value) + w_da * rda_value


def slm_metrics(prob: np.ndarray, regions: list[list[tuple[float, float]]]) -> dict[str, float]:
    """The four metrics of one query's probability map (values in [0, 1]) against its GT regions."""
    centres = attention_centres(prob)
    su = rsu(prob, region_mask(prob.shape, regions))
    as_, da = ras(regions, centres), rda(regions, centres)
    return {"Rsu": su, "Ras": as_, "Rda": da, "Rmi": rmi(su, as_, da), "attention_centres": len(centres)}


def crops(image_bgr: np.ndarray, protocol: SeLoProtocol) -> tuple[list[Window], list[bytes]]:
    """The windows of an image and their crops as the reference feeds them: resized to crop_size x
    crop_size with cubic interpolation, JPEG-encoded."""
    h, w = image_bgr.shape[:2]
    wins = windows(h, w, protocol.window_sizes)
    out = []
    for r0, r1, c0, c1 in wins:
        crop = cv2.resize(image_bgr[r0:r1, c0:c1], (protocol.crop_size, protocol.crop_size),
                          interpolation=cv2.INTER_CUBIC)
        ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, CROP_JPEG_QUALITY])
        if not ok:
            raise ValueError("could not encode a crop")
        out.append(data.tobytes())
    return wins, out


def decode_bgr(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable image")
    return image
