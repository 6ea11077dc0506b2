"""The review web app over real HTTP (uvicorn in a thread, ``requests``), on the real embedded
PostgreSQL: pages, CSRF, the token for a public host, the loopback Host check, crops only from
the crop store, and two reviewers deciding at once without losing a decision."""

from __future__ import annotations

import re
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
import pytest
import requests
import sqlalchemy as sa
from PIL import Image

from deer_pipeline.identity import reviews
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.review.app import ReviewAppError, ReviewConfig, create_app, safe_crop_path
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import T0, SyntheticWorld, deer_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def write_crops(engine, root: Path) -> None:
    """A small JPEG for every stored crop path (the synthetic world stores paths only)."""
    root.mkdir(parents=True, exist_ok=True)
    with engine.connect() as conn:
        paths = conn.execute(sa.text("SELECT crop_path FROM crops WHERE crop_path IS NOT NULL")).scalars().all()
    rng = np.random.default_rng(0)
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / p, "JPEG")


@pytest.fixture
def world(engine, tmp_path):
    """Two deer that look alike (scores near the threshold) and a third, decided."""
    w = SyntheticWorld(engine, noise=1.1, seed=2)
    ids = {}
    for i, ident in enumerate("ABABCABC"):
        ids.setdefault(ident, []).append(w.sighting("cam1" if i % 2 else "cam2", T0 + timedelta(hours=i), ident))
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.3))
    decide_partition(engine, "cam2", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.3))
    write_crops(engine, tmp_path / "crops")
    return w, ids


@pytest.fixture
def app_server(engine, world, tmp_path):
    server = Server(create_app(ReviewConfig(engine=engine, crop_store=tmp_path / "crops", reviewer="tester",
                                            margin=1.0)))
    yield server
    server.stop()


def csrf(session: requests.Session, url: str) -> str:
    html = session.get(url).text
    m = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert m, html[:500]
    return m.group(1)


# ---------------------------------------------------------------------------------------------

def test_pages_show_the_roster_a_deer_and_the_queue(engine, app_server, world):
    s = requests.Session()
    roster = s.get(app_server.url + "/deer?sort=sightings&dir=desc")
    assert roster.status_code == 200 and "deer-row" in roster.text
    rows = re.findall(r'class="deer-row" data-deer="(\d+)"', roster.text)
    with engine.connect() as conn:
        by_count = conn.execute(sa.text("SELECT deer_id FROM deer ORDER BY sighting_count DESC, deer_id")).scalars().all()
        counts = dict(conn.execute(sa.text("SELECT deer_id, sighting_count FROM deer")).all())
    assert [counts[int(r)] for r in rows] == sorted(counts.values(), reverse=True)
    assert set(map(int, rows)) == set(by_count)
    only2 = s.get(app_server.url + "/deer?camera=cam2&from=2024-05-01&to=2024-05-01").text
    with engine.connect() as conn:
        cam2 = set(conn.execute(sa.text("SELECT DISTINCT s.deer_id FROM sightings s JOIN detections d "
                                        "USING (detection_id) WHERE d.camera_id = 'cam2'")).scalars())
    assert set(map(int, re.findall(r'data-deer="(\d+)"', only2))) == cam2
    assert re.findall(r'data-deer="(\d+)"', s.get(app_server.url + "/deer?from=2030-01-01").text) == []

    deer = by_count[0]
    page = s.get(f"{app_server.url}/deer/{deer}")
    assert page.status_code == 200 and "encounter 1" in page.text and f"/deer/{deer}/weekly.png" in page.text
    crops = re.findall(r'src="/crop/([^"]+)"', page.text)
    assert len(crops) == counts[deer]
    img = s.get(f"{app_server.url}/crop/{crops[0]}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content[:2] == b"\xff\xd8"
    png = s.get(f"{app_server.url}/deer/{deer}/weekly.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    queue = s.get(app_server.url + "/queue")
    assert queue.status_code == 200 and 'data-item="decision|' in queue.text
    assert s.get(app_server.url + "/deer/999999").status_code == 404


def test_state_changes_need_post_and_a_csrf_token(engine, app_server, world):
    _, ids = world
    s = requests.Session()
    with engine.connect() as conn:
        deer = conn.execute(sa.text("SELECT deer_id FROM deer ORDER BY deer_id LIMIT 1")).scalar_one()
    url = f"{app_server.url}/deer/{deer}/name"
    assert s.get(url).status_code == 405                                   # not by GET
    assert s.post(url, data={"name": "Eve"}).status_code == 403            # no cookie, no token
    token = csrf(s, app_server.url + "/deer")
    assert s.post(url, data={"name": "Eve", "csrf_token": "0" * 64}).status_code == 403   # wrong token
    other = requests.Session()
    other_token = csrf(other, app_server.url + "/deer")
    assert s.post(url, data={"name": "Eve", "csrf_token": other_token}).status_code == 403  # not this browser's
    evil = s.post(url, data={"name": "Eve", "csrf_token": token}, headers={"Origin": "http://evil.example"},
                  allow_redirects=False)
    assert evil.status_code == 403
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM identity_reviews")).scalar_one() == 0
    ok = s.post(url, data={"name": "Bramble", "csrf_token": token}, allow_redirects=False)
    assert ok.status_code == 303
    with engine.connect() as conn:
        assert reviews.deer_names(conn) == {deer: "Bramble"}
    assert "Bramble" in s.get(f"{app_server.url}/deer/{deer}").text
    s.post(url, data={"name": "<script>alert(1)</script>", "csrf_token": token})
    page = s.get(f"{app_server.url}/deer/{deer}").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page     # names are escaped


def test_a_public_host_needs_a_token_and_loopback_answers_loopback_names_only(engine, tmp_path):
    with pytest.raises(ReviewAppError, match="DEER_REVIEW_TOKEN"):
        create_app(ReviewConfig(engine=engine, crop_store=tmp_path, reviewer="t", host="0.0.0.0"))
    server = Server(create_app(ReviewConfig(engine=engine, crop_store=tmp_path, reviewer="t", host="0.0.0.0",
                                            token="s3cret-token")))
    try:
        assert requests.get(server.url + "/deer").status_code == 401
        assert requests.get(server.url + "/deer", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(server.url + "/deer", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        s = requests.Session()
        first = s.get(server.url + "/deer?token=s3cret-token", allow_redirects=False)
        assert first.status_code == 303 and "token" not in first.headers["location"]
        assert s.get(server.url + "/deer").status_code == 200               # the cookie carries it now
        token = csrf(s, server.url + "/deer")
        assert requests.post(server.url + "/reviewer", data={"reviewer": "x", "csrf_token": token}).status_code == 401
    finally:
        server.stop()
    local = Server(create_app(ReviewConfig(engine=engine, crop_store=tmp_path, reviewer="t")))
    try:
        assert requests.get(local.url + "/deer").status_code == 200
        assert requests.get(local.url + "/deer", headers={"Host": "attacker.example"}).status_code == 421
    finally:
        local.stop()


def test_crops_come_only_from_the_crop_store(engine, app_server, world, tmp_path):
    _, ids = world
    secret = tmp_path / "secret.txt"
    secret.write_text("not a crop")
    det = ids["A"][0]
    s = requests.Session()
    assert s.get(f"{app_server.url}/crop/{det}").status_code == 200
    for bad in ("..%2F..%2Fsecret.txt", "../secret.txt", "%2E%2E%2Fsecret.txt", "nope"):
        r = s.get(f"{app_server.url}/crop/{bad}")
        assert r.status_code == 404 and "not a crop" not in r.text
    (tmp_path / "crops" / "link.jpg").symlink_to(secret)
    for stored in ("../secret.txt", str(secret), "link.jpg", "sub/../../secret.txt"):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE crops SET crop_path = :p WHERE detection_id = :d"), {"p": stored, "d": det})
        r = s.get(f"{app_server.url}/crop/{det}")
        assert r.status_code == 404 and "not a crop" not in r.text, stored
    assert safe_crop_path(tmp_path / "crops", "../secret.txt") is None
    assert safe_crop_path(tmp_path / "crops", f"{ids['B'][0]}.jpg") is not None


def test_two_reviewers_at_once_lose_no_decision(engine, app_server, world):
    from deer_pipeline.review import queue as review_queue

    with engine.connect() as conn:
        keys = [k for _, _, k in review_queue.queue_keys(conn, 1.0) if k.startswith("decision|")]
    assert len(keys) >= 2
    sessions = {who: requests.Session() for who in ("alice", "bob")}
    tokens = {who: csrf(s, app_server.url + "/queue") for who, s in sessions.items()}
    answers = {"alice": (keys[0], "same"), "bob": (keys[1], "different")}
    barrier = threading.Barrier(2)
    results = {}

    def answer(who):
        key, action = answers[who]
        barrier.wait(timeout=10)
        results[who] = sessions[who].post(app_server.url + "/queue/answer", allow_redirects=False, data={
            "csrf_token": tokens[who], "item_key": key, "action": action, "reviewer": who})

    threads = [threading.Thread(target=answer, args=(who,)) for who in answers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r.status_code == 303 and "recorded" in r.headers["location"] for r in results.values()), \
        {k: r.headers.get("location") for k, r in results.items()}
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT reviewer, kind, item_key, detections_a, detections_b FROM "
                                    "identity_reviews ORDER BY review_id")).all()
    assert sorted((r.reviewer, r.kind, r.item_key) for r in rows) == [
        ("alice", "same", keys[0]), ("bob", "different", keys[1])]
    d = deer_of(engine)
    for r in rows:                          # both decisions are in force
        together = {d[x] for x in r.detections_a} & {d[x] for x in r.detections_b}
        assert bool(together) == (r.kind == "same")
    # undo withdraws the reviewer's own last decision, not the other's
    t = tokens["alice"]
    r = sessions["alice"].post(app_server.url + "/queue/answer", allow_redirects=False,
                               data={"csrf_token": t, "action": "undo", "item_key": "", "reviewer": "alice"})
    assert r.status_code == 303
    with engine.connect() as conn:
        status = {(x.reviewer, x.kind): x.undone_by for x in conn.execute(sa.text(
            "SELECT reviewer, kind, undone_by FROM identity_reviews_status WHERE kind <> 'undo'"))}
    assert status[("alice", "same")] is not None and status[("bob", "different")] is None


def test_corrections_from_the_deer_page(engine, app_server, world):
    s = requests.Session()
    token = csrf(s, app_server.url + "/deer")
    with engine.connect() as conn:
        a, b = conn.execute(sa.text("SELECT deer_id FROM deer ORDER BY sighting_count DESC, deer_id LIMIT 2")).scalars()
    members = lambda deer: set(deer_of_members(engine, deer))  # noqa: E731
    both = members(a) | members(b)
    r = s.post(f"{app_server.url}/deer/{a}/merge", data={"other": str(b), "csrf_token": token}, allow_redirects=False)
    assert r.status_code == 303 and "merged" in unquote_plus(r.headers["location"])
    d = deer_of(engine)
    merged = d[next(iter(both))]
    assert {d[x] for x in both} == {merged}
    chosen = sorted(both)[:2]
    page = s.get(f"{app_server.url}/deer/{merged}").text
    assert all(f'value="{c}"' in page for c in chosen)                 # the split checkboxes
    r = s.post(f"{app_server.url}/deer/{merged}/split", allow_redirects=False,
               data={"sighting[]": chosen, "csrf_token": token})
    assert r.status_code == 303 and "split 2" in unquote_plus(r.headers["location"])
    d = deer_of(engine)
    assert d[chosen[0]] == d[chosen[1]] and not {d[c] for c in chosen} & {d[x] for x in both - set(chosen)}
    gone = sorted(both - set(chosen))[0]
    r = s.post(f"{app_server.url}/sighting/{gone}/unidentifiable", allow_redirects=False,
               data={"csrf_token": token, "back": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"].startswith("/deer")   # no open redirect
    assert gone not in deer_of(engine)
    listing = s.get(app_server.url + "/reviews").text
    assert listing.count("stands") == 3 and "merge" in listing and "split" in listing


def deer_of_members(engine, deer) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT detection_id FROM sightings WHERE deer_id = :d"), {"d": deer}).scalars().all()


def test_a_merge_candidate_answered_same_merges_the_two_deer(engine, tmp_path):
    from deer_pipeline.review import queue as review_queue

    w = SyntheticWorld(engine, noise=0.2, seed=5)
    first = [f[0] for f in w.burst("cam1", T0, [("A", "doe")], frames=4)]
    second = [f[0] for f in w.burst("cam1", T0 + timedelta(hours=2), [("A", "doe")], frames=4)]
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.97))
    d = deer_of(engine)
    assert d[first[0]] != d[second[0]]          # best pair below the threshold, profiles above it
    write_crops(engine, tmp_path / "crops")
    with engine.connect() as conn:
        keys = [k for _, _, k in review_queue.queue_keys(conn, 0.0) if k.startswith("merge|")]
    assert keys == [f"merge|{first[0]}|{second[0]}"]
    server = Server(create_app(ReviewConfig(engine=engine, crop_store=tmp_path / "crops", reviewer="t", margin=0.0)))
    try:
        s = requests.Session()
        page = s.get(server.url + "/queue").text
        assert f'data-item="{keys[0]}"' in page and "one animal?" in page
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page).group(1)
        r = s.post(server.url + "/queue/answer", allow_redirects=False,
                   data={"csrf_token": token, "item_key": keys[0], "action": "same"})
        assert r.status_code == 303 and "recorded" in r.headers["location"]
    finally:
        server.stop()
    d = deer_of(engine)
    assert len({d[x] for x in first + second}) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT kind FROM identity_reviews")).scalars().all() == ["merge"]
        assert [k for _, _, k in review_queue.queue_keys(conn, 0.0)] == []     # answered: gone


def test_new_unidentifiable_and_skip_answers(engine, app_server, world):
    from deer_pipeline.review import queue as review_queue

    with engine.connect() as conn:
        keys = [k for _, _, k in review_queue.queue_keys(conn, 1.0) if k.startswith("decision|")]
        items = {k: review_queue.load_item(conn, k) for k in keys[:3]}
    assert len(items) == 3
    s = requests.Session()
    token = csrf(s, app_server.url + "/queue")
    for key, action in zip(keys, ("new", "unidentifiable", "skip")):
        r = s.post(app_server.url + "/queue/answer", allow_redirects=False,
                   data={"csrf_token": token, "item_key": key, "action": action})
        assert r.status_code == 303 and f": {action}" in unquote_plus(r.headers["location"])
    d = deer_of(engine)
    new, unid, skip = (items[k] for k in keys[:3])
    shown = {x.detection_id for c in new.candidates for x in c.sightings}
    assert not {d[x] for x in new.query_ids if x in d} & {d[x] for x in shown if x in d}
    assert not set(unid.query_ids) & set(d)                       # left out of matching
    with engine.connect() as conn:
        open_keys = [k for _, skipped, k in review_queue.queue_keys(conn, 1.0)]
        skipped = [k for _, sk, k in review_queue.queue_keys(conn, 1.0) if sk]
    assert keys[0] not in open_keys and keys[1] not in open_keys
    assert skipped == [keys[2]] and open_keys[-1] == keys[2]     # skipped: still there, last


def test_which_deer_is_this_photo_lists_look_alikes_and_records_same(engine, app_server, world):
    _, ids = world
    det = ids["C"][0]
    s = requests.Session()
    page = s.get(f"{app_server.url}/sighting/{det}")
    assert page.status_code == 200 and "Which deer is this photo?" in page.text
    with engine.connect() as conn:
        own = conn.execute(sa.text("SELECT deer_id FROM sightings WHERE detection_id = :d"), {"d": det}).scalar_one()
        n_deer = conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one()
    listed = [int(d) for d in re.findall(r'<b>\d+\.</b> <a href="/deer/(\d+)"', page.text)]
    assert sorted(listed) == sorted(set(listed)) and len(listed) == n_deer           # every deer, once
    assert f'/deer/{own}"' in page.text and "its deer now" in page.text
    forms = re.findall(r'name="other" value="([^"]+)">\s*<input type="hidden" name="deer" value="(\d+)"', page.text)
    assert forms and all(int(d) != own for _, d in forms)
    other, other_deer = forms[0]
    token = csrf(s, f"{app_server.url}/sighting/{det}")
    r = s.post(f"{app_server.url}/sighting/{det}/same", data={"other": other, "deer": other_deer, "csrf_token": token},
               allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/sighting/{det}")
    with engine.connect() as conn:
        rv = reviews.all_reviews(conn)[-1]
    assert rv.kind == "same" and list(rv.a) == [det] and list(rv.b) == [other]
    assert deer_of(engine)[det] == deer_of(engine)[other]                            # replayed at once
    assert s.get(f"{app_server.url}/sighting/no-such-detection").status_code == 404
    deer_page = s.get(f"{app_server.url}/deer/{deer_of(engine)[det]}").text
    assert f'href="/sighting/{det}"' in deer_page
