"""The rating web app: Flask (synchronous handlers suit one fsync per answer; no ASGI server
needed) serving one plain HTML/JS page and a small JSON API over a drawn queue.

Every rater named at start (kept in `raters.json`) rates the same queue in the same order,
so their ratings overlap for agreement; each has their own position: the first sample they
have neither rated nor skipped, rebuilt from the ratings file at start.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from importlib import resources

from flask import Flask, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from rs5m_ray.rate.ratings import METRICS, RATINGS, RatingError, RatingsLog, check_flag, check_scores
from rs5m_ray.storage import Storage

RATERS = "raters.json"
RATER_NAME = re.compile(r"\w[\w .@-]{0,63}")
META_CAPTION_FIELDS = ("geometa_cap", "meta_caption")
# column -> (note, its `caption_pick` value)
NAMED_CAPTIONS = {"top_caption": ("rank 1", "top"),
                  "rotation_invariant_caption": ("rotation-invariant", "rotation_invariant")}
CANDIDATE_SCORES = {"candidate_score_a": "score A", "candidate_score_b": "score B",
                    "candidate_rotation_variance": "rotation variance"}


def update_raters(out_dir: str, names: list[str]) -> list[str]:
    """The raters of `out_dir`: those it holds plus `names` (kept, in order of arrival)."""
    path = os.path.join(out_dir, RATERS)
    held = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
    for name in names:
        if not RATER_NAME.fullmatch(name):
            raise ValueError(f"rater name {name!r}: use 1-64 letters, digits, spaces or . @ - _")
    raters = held + [n for n in dict.fromkeys(names) if n not in held]
    if raters != held:
        Storage().write_atomic(path, json.dumps(raters, ensure_ascii=False).encode())
    return raters


def _candidates(meta: dict) -> list[dict]:
    """The other captions of a sample, from the columns the caption stage writes
    (stages/caption.py): the two picks, then every candidate with its scores."""
    out = [{"text": str(meta[k]), "note": note + (", chosen" if meta.get("caption_pick") == pick else "")}
           for k, (note, pick) in NAMED_CAPTIONS.items() if meta.get(k)]
    for i, text in enumerate(meta.get("caption_candidates") or []):
        scores = [f"{label} {meta[col][i]:.3g}" for col, label in CANDIDATE_SCORES.items()
                  if isinstance(meta.get(col), list) and i < len(meta[col])
                  and isinstance(meta[col][i], (int, float))]
        out.append({"text": str(text), "note": ", ".join(scores)})
    return out


class RatingSession:
    """The queue, the raters and their answers of one ratings directory."""

    def __init__(self, out_dir: str, queue: dict, raters: list[str]):
        if not raters:
            raise ValueError(f"{out_dir} has no raters: name them with --raters")
        self.out_dir, self.raters = out_dir, raters
        self.samples = queue["samples"]
        self.index = {s["sample_id"]: i for i, s in enumerate(self.samples)}
        self.log = RatingsLog(os.path.join(out_dir, RATINGS))
        self.answers: dict[str, dict[str, dict]] = {r: {} for r in raters}  # rater -> sample_id -> row
        for row in self.log.rows:
            if row["rater"] in self.answers and row["sample_id"] in self.index:
                self.answers[row["rater"]][row["sample_id"]] = row

    def check_rater(self, name: str | None) -> str:
        if name not in self.answers:
            raise RatingError(f"unknown rater {name!r}; the raters are: {', '.join(self.raters)} "
                              "(add one with rs5m rate --raters)", 403)
        return name

    def position(self, rater: str) -> int:
        done = self.answers[rater]
        return next((i for i, s in enumerate(self.samples) if s["sample_id"] not in done), len(self.samples))

    def progress(self, rater: str) -> dict:
        return {"rater": rater, "position": self.position(rater), "total": len(self.samples),
                "answered": len(self.answers[rater])}

    def view(self, index: int, rater: str) -> dict:
        if not 0 <= index < len(self.samples):
            raise RatingError(f"sample {index} is not in the queue (it holds 0-{len(self.samples) - 1})", 404)
        s = self.samples[index]
        meta = s["meta"]
        row = self.answers[rater].get(s["sample_id"])
        answer = None if row is None else {
            "skipped": row["skipped"] == "1", "flag": row["flag"],
            **{m: int(row[m]) if row[m] else None for m in METRICS}}
        return {**self.progress(rater), "index": index, "sample_id": s["sample_id"], "source": s["source"],
                "shard": s["shard"], "img_name": s["img_name"], "caption": s["caption"],
                "image_url": f"/api/samples/{index}/image",
                "meta_caption": next((str(meta[k]) for k in META_CAPTION_FIELDS if meta.get(k)), None),
                "candidates": _candidates(meta), "meta": meta, "answer": answer}

    def answer(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise RatingError("send the answer as a JSON object")
        rater = self.check_rater(body.get("rater"))
        sample_id = body.get("sample_id")
        if sample_id not in self.index:
            raise RatingError(f"sample id {sample_id!r} is not in this queue", 404)
        scores, flag = check_scores(body), check_flag(body)
        s = self.samples[self.index[sample_id]]
        row = self.log.append({"image_path": s["img_name"], "description": s["caption"], **scores,
                               "rater": rater, "sample_id": sample_id, "shard": s["shard"], "source": s["source"],
                               "skipped": "1" if body.get("skip") else "0", "flag": flag})
        self.answers[rater][sample_id] = row
        return self.progress(rater)


def create_app(session: RatingSession) -> Flask:
    app = Flask(__name__, static_folder=None)
    page = resources.files("rs5m_ray.rate").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.errorhandler(RatingError)
    def refused(e: RatingError):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code

    @app.get("/")
    def index():
        return page, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @app.get("/api/raters")
    def raters():
        return jsonify(raters=session.raters, total=len(session.samples))

    @app.get("/api/raters/<name>")
    def rater(name: str):
        return jsonify(session.progress(session.check_rater(name)))

    @app.get("/api/samples/<int:index>")
    def sample(index: int):
        return jsonify(session.view(index, session.check_rater(request.args.get("rater"))))

    @app.get("/api/samples/<int:index>/image")
    def image(index: int):
        if not 0 <= index < len(session.samples):
            raise RatingError(f"sample {index} is not in the queue", 404)
        s = session.samples[index]
        return send_file(os.path.join(os.path.abspath(session.out_dir), s["image"]), mimetype=s["mimetype"],
                         max_age=3600)

    @app.post("/api/answers")
    def answers():
        return jsonify(session.answer(request.get_json(silent=True)))

    return app


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def serve(session: RatingSession, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (threaded: several raters at once)."""
    server = make_server(host, port, create_app(session), threaded=True)  # exits with a message if it cannot listen
    if not is_loopback(host):
        print(f"warning: listening on {host}, beyond this machine; there is no login, "
              "anyone who reaches it can rate as any rater", flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"rs5m rate: {len(session.samples)} samples, raters {', '.join(session.raters)}; "
          f"open http://{shown}:{server.server_port}/  (Ctrl-C stops; every answer is already saved)", flush=True)
    try:
        server.serve_forever()  # werkzeug's: Ctrl-C ends it and closes the socket
    finally:
        session.log.close()
