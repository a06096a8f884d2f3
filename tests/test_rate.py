"""`rs5m rate`: the queue drawn from shards, the ratings file, the API's refusals, the summary,
and the page driven in a real headless Chromium across a server crash."""
from __future__ import annotations

import csv
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from rs5m_ray.rate import draw
from rs5m_ray.rate.ratings import COLUMNS, METRICS, RATINGS, read_rows
from rs5m_ray.rate.server import RatingSession, create_app, update_raters
from rs5m_ray.rate.summary import format_summary, summarize, weighted_kappa
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.storage import Storage, join
from tests.conftest import REPO
from tests.report_browser import CHROMEDRIVER, CHROMIUM, chromium

SOURCES = ("ben", "fmow", "millionaid")


def scene(i: int, size: int = 224) -> bytes:
    """A small aerial-looking JPEG: fields, a road and a building, varied by `i`."""
    img = Image.new("RGB", (size, size), (86 + 9 * (i % 7), 120 + 5 * (i % 5), 70))
    d = ImageDraw.Draw(img)
    for k in range(4):
        x = (37 * i + 53 * k) % (size - 60)
        d.rectangle([x, 20 + 45 * k, x + 50, 55 + 45 * k], fill=(150 + 20 * k, 140, 90))
    d.line([0, (29 * i) % size, size, size - (29 * i) % size], fill=(200, 200, 200), width=6)
    d.rectangle([size // 2 - 15, size // 2 - 15, size // 2 + 15, size // 2 + 15], fill=(180, 60, 50))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_shards(root: str, storage: Storage, n_shards: int = 3, per_source: int = 4, sidecars=()) -> list[str]:
    """RS3-style val shards in the project's layout, every shard holding every source; the
    shards numbered in `sidecars` also get a parquet sidecar like the shard writer's."""
    urls = []
    for s in range(n_shards):
        members, rows = [], []
        for src in SOURCES:
            for j in range(per_source):
                sid = f"{src}_{s}_{j}"
                meta = {"sample_id": sid, "source": src,
                        "geometa_cap": f"a satellite image over place {s}-{j} in summer",
                        "top_caption": f"an aerial view of {src} scene {j}", "caption_pick": "top",
                        "caption_candidates": [f"candidate {k} of {sid}" for k in range(3)],
                        "candidate_score_a": [0.31, 0.29, 0.2], "candidate_score_b": [0.25, None, None]}
                members += sample_members(sid, scene(s * 100 + j), f"{src} caption {s} {j}: fields and a road", meta)
                rows.append({"sample_id": sid, "source": src})
        url = join(root, shard_name("rs3", "val", s))
        storage.write_atomic(url, tar_bytes(members))
        if s in sidecars:
            with storage.open(url.removesuffix(".tar") + ".parquet", "wb") as f:
                pq.write_table(pa.Table.from_pylist(rows), f)
        urls.append(url)
    return urls


def ids(q: dict) -> list[str]:
    return [s["sample_id"] for s in q["samples"]]


# ---------------------------------------------------------------- the draw

def test_allocate_spreads_evenly_and_caps_small_groups():
    assert draw.allocate({"a": 1, "b": 10, "c": 10}, 9, seed=0) == {"a": 1, "b": 4, "c": 4}
    assert draw.allocate({"a": 3, "b": 3}, 100, seed=0) == {"a": 3, "b": 3}
    quota = draw.allocate({"a": 5, "b": 5, "c": 5}, 7, seed=0)
    assert sum(quota.values()) == 7 and sorted(quota.values()) == [2, 2, 3]


def test_draw_is_seeded_and_spread_over_sources_and_shards(tmp_path):
    storage = Storage()
    urls = write_shards(str(tmp_path / "shards"), storage)
    q0 = draw.build_queue(urls, str(tmp_path / "a"), 9, seed=0)
    again = draw.build_queue(list(reversed(urls)), str(tmp_path / "b"), 9, seed=0)
    other = draw.build_queue(urls, str(tmp_path / "c"), 9, seed=1)
    assert ids(q0) == ids(again)  # the draw depends on the samples, not on the shard order
    assert ids(q0) != ids(other)
    # 9 of 3 sources x 3 shards: one sample of every (source, shard) cell
    cells = {(s["source"], s["shard"]) for s in q0["samples"]}
    assert len(cells) == 9 and q0["available"] == 36 and q0["skipped"] == {}
    ranks = [draw.rank_of(0, sid) for sid in ids(q0)]
    assert ranks == sorted(ranks)  # in rank order: sources and shards interleave
    first = q0["samples"][0]
    assert first["caption"].startswith(first["source"]) and first["meta"]["geometa_cap"]
    with Image.open(tmp_path / "a" / first["image"]) as img:
        assert img.size == (224, 224)
    # the same draw where shards have sidecars (listed without reading the tars)
    with_sidecars = write_shards(str(tmp_path / "shards2"), storage, sidecars={0, 2})
    q1 = draw.build_queue(with_sidecars, str(tmp_path / "d"), 9, seed=0)
    assert ids(q1) == ids(q0)


def test_draw_skips_broken_samples_and_reads_s3(tmp_path, s3_bucket):
    base, storage = s3_bucket
    urls = write_shards(f"{base}/shards", storage, n_shards=2, per_source=2)
    broken = join(f"{base}/shards", shard_name("rs3", "val", 2))
    members = sample_members("fmow_9_0", b"not an image", "a caption", {"source": "fmow"})
    no_caption = sample_members("fmow_9_1", scene(1), "c", {"source": "fmow"})
    members += [m for m in no_caption if not m[0].endswith(".caption")]
    storage.write_atomic(broken, tar_bytes(members))
    out = str(tmp_path / "r")
    q = draw.open_queue(out, [f"{base}/shards/rs3-val-*.tar"], 100, 0, storage)
    assert len(q["samples"]) == 12 and q["shards"] == urls + [broken]
    assert q["skipped"] == {"corrupt_image": 1, "incomplete_sample": 1}
    assert draw.open_queue(out, None, 5, 3, storage) == q  # kept: no shards needed to go on
    with pytest.raises(ValueError, match="other sample, seed"):
        draw.open_queue(out, [f"{base}/shards/rs3-val-*.tar"], 5, 3, storage)
    with pytest.raises(ValueError, match="no shards match"):
        draw.open_queue(str(tmp_path / "r2"), [f"{base}/nothing-*.tar"], 5, 0, storage)


# ---------------------------------------------------------------- the API and the ratings file

@pytest.fixture
def rating_dir(tmp_path):
    out = str(tmp_path / "ratings")
    draw.build_queue(write_shards(str(tmp_path / "shards"), Storage()), out, 6, seed=0)
    update_raters(out, ["alice", "bob"])
    return out


def session_of(out: str) -> RatingSession:
    return RatingSession(out, draw.load_queue(out), update_raters(out, []))


def test_api_refuses_bad_input_and_writes_nothing(rating_dir):
    session = session_of(rating_dir)
    client = create_app(session).test_client()
    sid = session.samples[0]["sample_id"]
    good = {"rater": "alice", "sample_id": sid, "relevance_detail": 4, "hallucination": 5, "fluency": 5}

    def refused(body, status, text):
        r = client.post("/api/answers", json=body)
        assert r.status_code == status and text in r.get_json()["error"], r.get_json()

    refused({**good, "rater": "mallory"}, 403, "unknown rater 'mallory'; the raters are: alice, bob")
    refused({**good, "hallucination": 7}, 400, "hallucination must be an integer from 1 to 5, got 7")
    refused({**good, "fluency": "5"}, 400, "fluency must be an integer from 1 to 5, got '5'")
    refused({**good, "fluency": True}, 400, "fluency must be an integer")
    refused({k: v for k, v in good.items() if k != "fluency"}, 400, "fluency is missing")
    refused({**good, "sample_id": "fmow_9_9"}, 404, "sample id 'fmow_9_9' is not in this queue")
    refused({**good, "skip": True}, 400, "a skip carries no scores")
    refused({**good, "flag": "x" * 3000}, 400, "at most 2000")
    r = client.post("/api/answers", data="not json", content_type="application/json")
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]
    assert client.get("/api/samples/99?rater=alice").status_code == 404
    assert client.get("/api/samples/0?rater=eve").status_code == 403
    assert client.get("/api/raters/eve").get_json()["error"].startswith("unknown rater 'eve'")
    assert read_rows(os.path.join(rating_dir, RATINGS)) == []
    with pytest.raises(ValueError, match="rater name"):
        update_raters(rating_dir, ["<script>"])


def test_raters_keep_their_own_position_and_latest_answer_wins(rating_dir):
    session = session_of(rating_dir)
    client = create_app(session).test_client()
    sids = [s["sample_id"] for s in session.samples]

    def answer(rater, i, scores=(5, 4, 3), **extra):
        body = {"rater": rater, "sample_id": sids[i], **dict(zip(METRICS, scores)), **extra}
        r = client.post("/api/answers", json=body)
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    assert answer("alice", 0)["position"] == 1
    assert answer("alice", 1, (2, 2, 2), flag="blurry")["position"] == 2
    assert answer("bob", 0, (None, None, None), skip=True)["position"] == 1
    assert answer("alice", 0, (1, 1, 1))["position"] == 2  # back and re-rate: position stays
    view = client.get("/api/samples/0?rater=alice").get_json()
    assert view["answer"] == {"skipped": False, "flag": "", "relevance_detail": 1, "hallucination": 1, "fluency": 1}
    assert view["meta_caption"].startswith("a satellite image over place")
    assert [c["note"] for c in view["candidates"]] == ["rank 1, chosen", "score A 0.31, score B 0.25",
                                                         "score A 0.29", "score A 0.2"]
    assert client.get(view["image_url"]).mimetype == "image/jpeg"
    assert client.get("/").status_code == 200

    restarted = session_of(rating_dir)  # what a restart rebuilds from the ratings file
    assert restarted.position("alice") == 2 and restarted.position("bob") == 1
    rows = read_rows(os.path.join(rating_dir, RATINGS))
    assert len(rows) == 4 and list(rows[0]) == list(COLUMNS)
    assert rows[1]["flag"] == "blurry" and rows[2]["skipped"] == "1" and rows[2]["fluency"] == ""
    summary = summarize(rating_dir)  # latest wins: alice's 0 counts as 1/1/1; bob's skip is out
    assert summary["rated"] == 2 and summary["skipped"] == 1
    assert summary["table"]["overall"]["relevance_detail"]["mean"] == 1.5


def test_a_torn_last_record_is_cut_and_nothing_else_lost(rating_dir):
    session = session_of(rating_dir)
    client = create_app(session).test_client()
    for s in session.samples[:3]:
        client.post("/api/answers", json={"rater": "bob", "sample_id": s["sample_id"], "relevance_detail": 3,
                                          "hallucination": 3, "fluency": 3, "flag": "two\nlines"})
    session.log.close()
    path = os.path.join(rating_dir, RATINGS)
    whole = Path(path).read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of the next record, inside a quoted field
        f.write('fmow_0_1.jpg,"a caption cut\nin the middle of é'.encode()[:-1])
    session = session_of(rating_dir)
    assert Path(path).read_bytes() == whole and session.position("bob") == 3
    client = create_app(session).test_client()
    r = client.post("/api/answers", json={"rater": "bob", "sample_id": session.samples[3]["sample_id"], "skip": True})
    assert r.get_json()["position"] == 4
    rows = read_rows(path)
    assert len(rows) == 4 and rows[0]["flag"] == "two\nlines"


# ---------------------------------------------------------------- the summary

def test_summary_table_and_agreement_by_hand(tmp_path, capsys):
    a = [5, 4, 4, 3, 5, 2]
    b = [5, 4, 3, 3, 4, 1]
    path = tmp_path / "two.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for rater, scores in (("ann", a), ("bo", b)):
            for i, v in enumerate(scores):
                src = "fmow" if i < 3 else "ben"
                w.writerow([f"{src}_{i}.jpg", "c", v, v, 5, rater, "t", f"s{i}", "x.tar", src, "0", ""])
    summary = summarize(str(path))
    fmow = summary["table"]["fmow"]["relevance_detail"]
    assert summary["table"]["fmow"]["n"] == 6 and fmow["mean"] == pytest.approx((5 + 4 + 4 + 5 + 4 + 3) / 6)
    rel = next(x for x in summary["agreement"] if x["metric"] == "relevance_detail")
    assert rel["n"] == 6 and rel["exact"] == pytest.approx(3 / 6) and rel["within_1"] == 1.0
    # quadratic kappa = 1 - mean squared difference of the pairs / mean squared difference of all cross pairs
    paired = sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)
    crossed = sum((x - y) ** 2 for x in a for y in b) / len(a) ** 2
    assert rel["kappa"] == pytest.approx(1 - paired / crossed)
    assert weighted_kappa([3, 3], [3, 3]) is None  # no spread: kappa undefined, shown as '-'
    from rs5m_ray.cli import main

    assert main(["rate", "--summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"overall\s+12\s+3\.58 ± 1\.24", out) and "ann ~ bo" in out


def test_summary_of_rs5m_real_ratings(shared_data):
    """RS5M's own ratings file, read as an existing ratings file, against pandas on the same CSV."""
    import pandas as pd

    path = shared_data / "rs5m" / "ratings_1_500.csv"
    summary = summarize(str(path))
    df = pd.read_csv(path)
    df["subset"] = df["image_path"].str.extract(r"static/([a-z]+)_")[0]
    assert set(df["subset"]) == {"ben", "fmow", "millionaid"} and summary["rated"] == len(df) == 500
    for subset, group in [*df.groupby("subset"), ("overall", df)]:
        row = summary["table"][subset]
        assert row["n"] == len(group)
        for m in METRICS:
            assert row[m]["n"] == group[m].count()
            assert row[m]["mean"] == pytest.approx(group[m].mean(), abs=1e-12)
            assert row[m]["std"] == pytest.approx(group[m].std(ddof=1), abs=1e-12)
    # the notes' own computation on this file (§2.6): 4.25 / 4.48 / 4.92
    overall = summary["table"]["overall"]
    assert [round(overall[m]["mean"], 2) for m in METRICS] == [4.25, 4.48, 4.92]
    print("\n" + format_summary(summary))


# ---------------------------------------------------------------- the page in a real browser



class Server:
    """`rs5m rate` in its own process, as a user runs it; `crash()` SIGKILLs it."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "rs5m_ray.cli", "rate", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline, seen = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"server exited: {''.join(seen)}"
                continue
            seen.append(line)
            if m := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
                self.url = m.group(1)
                return
        raise AssertionError(f"server did not start: {''.join(seen)}")

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromedriver (apt)")
def test_page_rates_with_the_keyboard_and_resumes_after_a_crash(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shards = str(tmp_path / "shards")
    write_shards(shards, Storage())
    out = str(tmp_path / "ratings")
    server = Server(["--shards", f"{shards}/rs3-val-*.tar", "--out", out, "--sample", "12", "--raters", "alice,bob"])
    driver = None
    try:
        driver = chromium(tmp_path / "chromium-profile", "1280,900")
        wait = WebDriverWait(driver, 30)

        def shows(text: str) -> None:
            wait.until(lambda d: text in d.find_element(By.ID, "progress-text").text)

        driver.get(server.url)  # no rater named: the page asks who is rating
        wait.until(lambda d: d.find_element(By.ID, "rater-buttons").text)
        driver.find_element(By.XPATH, "//button[text()='alice']").click()
        shows("Sample 1 of 12 · 0 answered")
        typed = [(5, 4, 5), (4, 4, 5), (3, 2, 4), (5, 5, 5), (2, 3, 1)]
        body = driver.find_element(By.TAG_NAME, "body")
        for n, scores in enumerate(typed, start=1):
            body.send_keys(*map(str, scores), Keys.ENTER)
            shows(f"Sample {n + 1} of 12 · {n} answered")
        body.send_keys("4")  # a score not saved yet: lost with the crash, as it should be

        server.crash()
        server = Server(["--out", out])  # the queue and raters are kept: no --shards needed
        rows = read_rows(os.path.join(out, RATINGS))
        q = draw.load_queue(out)
        assert [r["sample_id"] for r in rows] == ids(q)[:5]
        assert [tuple(int(r[m]) for m in METRICS) for r in rows] == typed
        assert {r["rater"] for r in rows} == {"alice"} and {r["skipped"] for r in rows} == {"0"}

        driver.get(f"{server.url}?rater=alice")
        shows("Sample 6 of 12 · 5 answered")
        assert driver.find_element(By.ID, "caption").text == q["samples"][5]["caption"]
        wait.until(lambda d: d.execute_script("const i = document.getElementById('image');"
                                              "return i.complete && i.naturalWidth > 0"))
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.ENTER)  # nothing rated yet: refused on the page, nothing written
        wait.until(lambda d: "missing Relevance & detail" in d.find_element(By.ID, "message").text)
        body.send_keys("4", "5", "d")  # two scores and the details folded out, for the screenshot
        wait.until(lambda d: d.find_element(By.ID, "candidates").is_displayed())
        shot = tmp_path / "rate-page.png"
        driver.save_screenshot(str(shot))
        kept = REPO / "runs" / "test-artifacts" / "rate-page.png"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, kept)
        print(f"\nscreenshot of the rating page: {kept}")
        assert len(read_rows(os.path.join(out, RATINGS))) == 5
    finally:
        if driver is not None:
            driver.quit()
        server.crash()
