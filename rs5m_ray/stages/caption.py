"""RS3 captioning stage (notes §2.2-2.3): candidates, ranking, rotation pick, final caption.

`CaptionStage` is a model stage (one per actor): each image is decoded once, at the size the
largest consumer needs (captioner, both rankers, the rotated views), and every model works on that
one decode. Per chunk of `caption.batch_size` images the captioner samples all candidates in one
`generate` call (the image tower runs once per image); the ranker (`stages.caption_rank`) then
keeps 10 of 20 by model A, 5 of 10 by model B, and picks the rotation-invariant one.

Seeds: a chunk's sampling seed is a hash of `caption.seed` and the chunk's sample_ids, so a rerun
of a part (same rows, same row groups) samples the same candidates on the same hardware and
software. The final pick between `top_caption` and `rotation_invariant_caption` hashes the
sample_id alone (`caption_rank.final_picks`).

Columns added: `caption` (the final pick), `top_caption`, `rotation_invariant_caption`,
`caption_pick` (top | rotation_invariant), `caption_candidates` (all of them, in sampled order)
and per candidate `candidate_score_a`, `candidate_score_b`, `candidate_rotation_variance`
(null where a step did not score it). Without ranking (`caption_rank.enabled: false`) the
first non-empty candidate is the caption. Drops: `decode_error` (bytes that do not decode or
no bytes), `no_caption` (generation failed for this image; the detail has the error),
`empty_candidates` (every candidate was empty text).
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray.data
from PIL import Image

from rs5m_ray.config import CaptionConfig, CaptionRankConfig
from rs5m_ray.ledger import Accounted, mark_dropped
from rs5m_ray.models.captioner import Captioner, load_captioner
from rs5m_ray.models.images import open_rgb
from rs5m_ray.stages.caption_rank import TOP, CaptionRanker, Ranked, final_picks
from rs5m_ray.stages.keep_rule import seeded_order
from rs5m_ray.storage import Storage

log = logging.getLogger(__name__)
STAGE = "caption"
VLLM_MISSING = "no candidates from the vllm backend"
SCORE_COLUMNS = ("candidate_score_a", "candidate_score_b", "candidate_rotation_variance")
CAPTION_SCHEMA = pa.schema(
    [("caption", pa.string()), ("top_caption", pa.string()), ("rotation_invariant_caption", pa.string()),
     ("caption_pick", pa.string()), ("caption_candidates", pa.list_(pa.string()))]
    + [(c, pa.list_(pa.float32())) for c in SCORE_COLUMNS])


def chunk_seed(seed: int, sample_ids: list[str]) -> int:
    """A generation seed fixed by the configured seed and the chunk's rows alone."""
    return int(np.bitwise_xor.reduce(seeded_order(sample_ids, seed)) % (2**63))


def generation_kwargs(cfg: CaptionConfig) -> dict:
    return {"top_p": cfg.top_p, "top_k": cfg.top_k, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "prompt": cfg.prompt}


class CaptionStage:
    """Stage (callable class, one per actor): a batch with `jpg` and `sample_id` -> the caption columns."""

    def __init__(self, cfg: CaptionConfig, rank: CaptionRankConfig, storage: Storage | None = None):
        self.cfg, self.rank_cfg = cfg, rank
        # The vllm backend samples in its own engine (`vllm_candidates`): rows arrive with candidates.
        self.captioner: Captioner | None = load_captioner(cfg, storage) if cfg.backend == "hf" else None
        self.ranker = CaptionRanker(rank, cfg.device, storage) if rank.enabled else None
        self.decode_size = max(self.captioner.image_size if self.captioner else 0,
                               self.ranker.decode_size if self.ranker else 0)

    def _decode(self, data: list[bytes | None]) -> tuple[list[Image.Image | None], list[str | None]]:
        images, errors = [], []
        for d in data:
            try:
                if not d:
                    raise ValueError("no image bytes")
                images.append(open_rgb(d, self.decode_size))
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - untrusted bytes: the row's drop reason
                images.append(None)
                errors.append(f"{type(e).__name__}: {e}"[:300])
        return images, errors

    def candidates(self, images: list[Image.Image], sample_ids: list[str]) -> tuple[list[list[str] | None], list[str | None]]:
        """All candidates of `images` from one generate call; if it fails, image by image, so one
        image that breaks the model costs only its own row (`no_caption` with the error)."""
        kwargs = generation_kwargs(self.cfg)
        n = self.cfg.num_candidates
        try:
            return self.captioner.generate(images, n, chunk_seed(self.cfg.seed, sample_ids), **kwargs), \
                [None] * len(images)
        except Exception as e:  # noqa: BLE001 - retried per image below
            if len(images) == 1:
                return [None], [f"{type(e).__name__}: {e}"[:300]]
            log.warning("caption chunk of %d failed (%s); retrying image by image", len(images), e)
        out, errors = [], []
        for img, sid in zip(images, sample_ids):
            got, err = self.candidates([img], [sid])
            out += got
            errors += err
        return out, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        sample_ids = batch["sample_id"].to_pylist()
        images, decode_errors = self._decode(batch["jpg"].to_pylist())
        cands: list[list[str] | None] = [None] * n if self.captioner else batch["caption_candidates"].to_pylist()
        gen_errors: list[str | None] = [None] * n if self.captioner else \
            [VLLM_MISSING if c is None else None for c in cands]
        ranked: list[Ranked | None] = [None] * n
        live = [i for i in range(n) if images[i] is not None]
        step = self.cfg.batch_size
        for s in range(0, len(live), step):
            rows = live[s:s + step]
            if self.captioner:
                got, errs = self.candidates([images[i] for i in rows], [sample_ids[i] for i in rows])
                for i, c, e in zip(rows, got, errs):
                    cands[i], gen_errors[i] = c, e
            if self.ranker:
                scored = [i for i in rows if cands[i]]
                for i, r in zip(scored, self.ranker.rank([images[i] for i in scored], [cands[i] for i in scored])):
                    ranked[i] = r
        batch = append_caption_columns(batch, cands, ranked, final_picks(sample_ids, self.rank_cfg.seed),
                                       ranking=self.ranker is not None)
        batch = mark_dropped(batch, np.array([e is not None for e in decode_errors]), "decode_error",
                             pa.array(decode_errors, pa.string()))
        batch = mark_dropped(batch, np.array([e is not None for e in gen_errors]), "no_caption",
                             pa.array(gen_errors, pa.string()))
        empty = np.array([c is not None and not any(c) for c in cands])
        return mark_dropped(batch, empty, "empty_candidates", f"{self.cfg.num_candidates} empty candidates")


def append_caption_columns(batch: pa.Table, cands: list[list[str] | None], ranked: list[Ranked | None],
                           picks: list[str], ranking: bool) -> pa.Table:
    """The caption columns (CAPTION_SCHEMA) of `batch`, from each row's candidates and ranking."""
    cols: dict[str, list] = {f.name: [] for f in CAPTION_SCHEMA}
    for c, r, pick in zip(cands, ranked, picks):
        first = next((t for t in c or () if t), None)
        top = r.top_caption if r else None if ranking else first
        rot = r.rotation_invariant_caption if r else None
        cols["caption"].append(top if pick == TOP or rot is None else rot)
        cols["top_caption"].append(top)
        cols["rotation_invariant_caption"].append(rot)
        cols["caption_pick"].append((pick if rot is not None else TOP) if top is not None else None)
        cols["caption_candidates"].append(c)
        for name, field in zip(SCORE_COLUMNS, ("score_a", "score_b", "rotation_variance")):
            cols[name].append(getattr(r, field) if r else None)
    for f in CAPTION_SCHEMA:
        if f.name in batch.column_names:
            batch = batch.drop_columns([f.name])  # e.g. the rs3 rows' empty `caption`
        batch = batch.append_column(f.name, pa.array(cols[f.name], f.type))
    return batch


def caption_images(ds: ray.data.Dataset, cfg: CaptionConfig, rank: CaptionRankConfig, output: str,
                   storage: Storage) -> ray.data.Dataset:
    """Captioning as an accounted actor-pool stage: resources and pool size from `cfg`. With the
    vllm backend, vLLM engines sample the candidates first and the actors rank them."""
    if cfg.backend == "vllm":
        ds = vllm_candidates(ds, cfg, storage)
    return ds.map_batches(
        Accounted,
        fn_constructor_kwargs={"stage_name": STAGE, "output": output, "storage": storage, "stage": CaptionStage,
                               "stage_kwargs": {"cfg": cfg, "rank": rank, "storage": storage}},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.num_gpus or None, num_cpus=cfg.num_cpus, batch_size=cfg.batch_size, batch_format="pyarrow")


# The vllm backend (ray.data.llm, optional: needs vllm and a GPU). ray.data.llm keeps one output
# per request, so each image becomes `num_candidates` requests with their own seeds; they share the
# image's multimodal uuid, so vLLM's encoder cache can run the image tower once per image.


def vllm_requests(row: dict, cfg: CaptionConfig, image_size: int) -> list[dict]:
    """One request row per candidate of `row`, the image decoded once, at the captioner's input size
    (none when it does not decode: the ranking actors record the decode_error)."""
    try:
        img = open_rgb(row["jpg"], image_size).resize((image_size, image_size), Image.BICUBIC)
    except Exception:  # noqa: BLE001 - untrusted bytes: recorded downstream
        return []
    pixels = np.asarray(img)
    seeds = seeded_order([f"{row['sample_id']}/{j}" for j in range(cfg.num_candidates)], cfg.seed)
    sampling = {"n": 1, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k or -1,
                "max_tokens": cfg.max_new_tokens}
    return [{"sample_id": row["sample_id"], "candidate": j, "pixels": pixels,
             "sampling_params": {**sampling, "seed": int(seeds[j] % 2**31)}} for j in range(cfg.num_candidates)]


def vllm_prompt(row: dict, prompt: str | None) -> dict:
    return {"sample_id": row["sample_id"], "candidate": row["candidate"], "prompt": prompt or "",
            "multimodal_data": {"image": Image.fromarray(row["pixels"])},
            "multimodal_uuids": {"image": [row["sample_id"]]}, "sampling_params": row["sampling_params"]}


def vllm_output(row: dict) -> dict:
    return {"sample_id": row["sample_id"], "candidate": row["candidate"], "text": row["generated_text"].strip()}


def collect_candidates(rows: pa.Table) -> pa.Table:
    """map_groups: one image's candidate rows -> its candidates in candidate order."""
    rows = rows.sort_by("candidate")
    return pa.table({"sample_id": [rows["sample_id"][0].as_py()], "caption_candidates": [rows["text"].to_pylist()]})


def vllm_candidates(ds: ray.data.Dataset, cfg: CaptionConfig, storage: Storage | None = None) -> ray.data.Dataset:
    """`ds` with a `caption_candidates` column sampled by vLLM engines (null where none came back)."""
    from functools import partial

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoImageProcessor

    from rs5m_ray.models.captioner import TINY_CAPTIONER, input_size, tiny_captioner_dir
    from rs5m_ray.models.weights import resolve_model_dir

    if cfg.lora_adapter:
        raise ValueError("caption.lora_adapter with backend vllm: merge the adapter into the weights first")
    path = tiny_captioner_dir(cfg.weights_cache_dir) if cfg.model == TINY_CAPTIONER else \
        resolve_model_dir(cfg.model, storage, cfg.weights_cache_dir)
    image_size = input_size(AutoImageProcessor.from_pretrained(path))
    processor = build_processor(
        vLLMEngineProcessorConfig(model_source=path, engine_kwargs={"dtype": "auto", **cfg.vllm_engine_kwargs},
                                  batch_size=cfg.batch_size * cfg.num_candidates, concurrency=cfg.max_actors,
                                  # a plain prompt, tokenized and detokenized by vLLM itself
                                  chat_template_stage=False, tokenize_stage=False, detokenize_stage=False),
        preprocess=partial(vllm_prompt, prompt=cfg.prompt), postprocess=vllm_output)
    requests = ds.select_columns(["sample_id", "jpg"]).flat_map(
        partial(vllm_requests, cfg=cfg, image_size=image_size))
    found = processor(requests).groupby("sample_id").map_groups(collect_candidates, batch_format="pyarrow")
    return ds.join(found, join_type="left_outer", num_partitions=8 * cfg.max_actors, on=("sample_id",))
