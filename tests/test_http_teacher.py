"""The OpenAI-compatible teacher against a real local server (``afmrl serve-teacher``, started
as its own process), and the per-listing annotation cache."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from afmrl_dagster.attributes.annotation_cache import AnnotationCache, annotate_with_cache
from afmrl_dagster.attributes.http_teacher import EndpointConfig, OpenAICompatibleTeacher, TeacherEndpointError
from afmrl_dagster.attributes.prompts import TEACHER_PROMPT
from afmrl_dagster.attributes.teacher import attribute_table
from afmrl_dagster.storage import LocalObjectStore
from teacher_process import teacher_server


def _listings(tmp_path: Path) -> pl.DataFrame:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(photo)
    return pl.DataFrame({
        "listing_id": ["ssd-1", "ram-1", "tee-1"],
        "title": ["SanDisk 480GB SSD Plus", "Crucial 8GB DDR4 2666MHz CT8G4DFS8266", "Plain cotton tee"],
        "description": [None, "Desktop memory", None],
        "image_uri": [str(photo), None, None],
    })


def _teacher(base_url: str, **overrides) -> OpenAICompatibleTeacher:
    settings = {"model": "title-facts", "revision": "1", "backoff_s": 0.01, "max_retries": 3, "timeout_s": 20, **overrides}
    config = EndpointConfig(base_url=base_url, **settings)
    return OpenAICompatibleTeacher(config, read_image=lambda uri: Path(uri).read_bytes())


def test_prompt_renders_vocabulary_and_is_versioned():
    text = TEACHER_PROMPT.render("Arla milk 1 l", None, keys={"volume", "brand"})
    assert "Title: Arla milk 1 l" in text and "Use only these keys: brand, volume." in text and "Description: (none)" in text
    assert TEACHER_PROMPT.id == "teacher-v1"


def test_http_teacher_annotates_in_order_with_images_and_concurrency(tmp_path):
    with teacher_server() as base_url:
        outputs = _teacher(base_url, concurrency=3).annotate(_listings(tmp_path))
    assert [json.loads(text) for text in outputs] == [
        {"storage": "480 gb"},
        {"storage": "8 gb", "frequency": "2666 mhz", "model": "ddr4, ct8g4dfs8266"},
        {},
    ]


def test_http_teacher_reads_each_image_only_when_its_request_goes_out(tmp_path):
    """Images stream per request: at any moment at most ``concurrency`` of the 12 photos have been
    read and not yet answered, not the whole chunk."""
    import threading
    import time

    photos = []
    for i in range(12):
        photos.append(tmp_path / f"photo-{i}.png")
        Image.new("RGB", (16, 16), (20 * i, 30, 30)).save(photos[-1])
    listings = pl.DataFrame({"listing_id": [f"p-{i}" for i in range(12)], "title": [f"Photo {i} 480GB SSD" for i in range(12)],
                             "description": [None] * 12, "image_uri": [str(p) for p in photos]})
    events, lock = [], threading.Lock()

    def read_image(uri: str) -> bytes:
        with lock:
            events.append("read")
        return Path(uri).read_bytes()

    with teacher_server() as base_url:
        teacher = OpenAICompatibleTeacher(EndpointConfig(base_url=base_url, model="title-facts", revision="1", concurrency=2),
                                          read_image=read_image)
        send = teacher.complete

        def complete(listing_id, messages):  # a slow link: 0.1 s per request
            time.sleep(0.1)
            answer = send(listing_id, messages)
            with lock:
                events.append("answered")
            return answer

        teacher.complete = complete
        outputs = teacher.annotate(listings)
    assert len(outputs) == 12 and events.count("read") == 12
    held = [events[: i + 1].count("read") - events[: i + 1].count("answered") for i in range(len(events))]
    assert max(held) <= 2, events  # read but not yet answered: never more than the requests in flight


@pytest.mark.parametrize("status", [429, 503])
def test_http_teacher_retries_throttling_and_server_errors(tmp_path, status):
    with teacher_server("--fail-first", "3", "--fail-status", str(status)) as base_url:
        outputs = _teacher(base_url, concurrency=1).annotate(_listings(tmp_path))  # the 4th and last attempt succeeds
    assert json.loads(outputs[0]) == {"storage": "480 gb"}
    with teacher_server("--fail-first", "10") as base_url, pytest.raises(TeacherEndpointError, match=r"'ssd-1'.*failed 4 times.*HTTP 503"):
        _teacher(base_url, concurrency=1).annotate(_listings(tmp_path))


def test_http_teacher_errors_name_the_listing_and_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("AFMRL_TEST_TEACHER_KEY", "right-key")
    with teacher_server("--require-key-env", "AFMRL_TEST_TEACHER_KEY") as base_url:
        assert json.loads(_teacher(base_url, api_key_env="AFMRL_TEST_TEACHER_KEY").annotate(_listings(tmp_path).head(1))[0])
        monkeypatch.setenv("AFMRL_TEST_TEACHER_KEY", "wrong-key")
        with pytest.raises(TeacherEndpointError, match=r"'ssd-1'.*refused the credentials.*AFMRL_TEST_TEACHER_KEY"):
            _teacher(base_url, api_key_env="AFMRL_TEST_TEACHER_KEY").annotate(_listings(tmp_path))
        monkeypatch.setenv("AFMRL_TEST_TEACHER_KEY", "right-key")
        with pytest.raises(TeacherEndpointError, match=r"'ssd-1'.*rejected.*not served here"):
            OpenAICompatibleTeacher(EndpointConfig(base_url=base_url, model="other", api_key_env="AFMRL_TEST_TEACHER_KEY")).annotate(
                _listings(tmp_path).head(1))
    # The server is gone: connection errors are retried, then reported.
    with pytest.raises(TeacherEndpointError, match=r"'ssd-1'.*cannot connect"):
        _teacher(base_url, max_retries=1).annotate(_listings(tmp_path).head(1))


def test_cache_generates_only_new_or_changed_listings(tmp_path):
    cache = AnnotationCache(LocalObjectStore(tmp_path / "store"))
    listings = _listings(tmp_path)
    with teacher_server() as base_url:
        teacher = _teacher(base_url)
        first, stats = annotate_with_cache(teacher, listings, cache, read_image=lambda uri: Path(uri).read_bytes())
        assert (stats.cached, stats.generated) == (0, 3)
        again, stats = annotate_with_cache(teacher, listings, cache, read_image=lambda uri: Path(uri).read_bytes())
        assert (stats.cached, stats.generated) == (3, 0) and again == first
        # A changed title, and a changed photo, are new content; the rest stays cached.
        Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "photo.png")
        changed = listings.with_columns(pl.when(pl.col("listing_id") == "tee-1").then(pl.lit("Cotton tee 500ml")).otherwise(pl.col("title")).alias("title"))
        third, stats = annotate_with_cache(teacher, changed, cache, read_image=lambda uri: Path(uri).read_bytes())
        assert (stats.cached, stats.generated) == (1, 2) and json.loads(third[2]) == {"volume": "500 ml"}
    # Another model revision is another identity: nothing of the old one is reused.
    other = OpenAICompatibleTeacher(EndpointConfig(base_url=base_url, model="title-facts", revision="2"))
    assert other.cache_identity != teacher.cache_identity
    assert cache.lookup(other.cache_identity) == {}


def test_noise_from_a_served_language_model_is_recorded_invalid_with_its_raw_text(tmp_path):
    from afmrl_dagster.vlm.tiny_models import build_tiny_causal_lm

    folder = build_tiny_causal_lm(tmp_path / "tiny-lm")
    with teacher_server("--model", f"hf:{folder}") as base_url:
        config = EndpointConfig(base_url=base_url, model=f"hf:{folder}", max_tokens=12, timeout_s=60)
        outputs = OpenAICompatibleTeacher(config).annotate(_listings(tmp_path).head(2))
    table = attribute_table(["ssd-1", "ram-1"], outputs, "tiny-lm")
    assert table["raw_text"].to_list() == outputs and all(text for text in outputs)
    assert not table["is_valid"].any() and table["error"].null_count() == 0


@pytest.mark.parametrize("header", ["-1", "nan", "inf", "-inf", "Wed, 21 Oct 2026 07:28:00 GMT", "soon"])
def test_a_retry_after_that_is_not_a_wait_falls_back_to_the_backoff(header):
    """Only a finite, non-negative ``Retry-After`` is honoured; anything else would reach
    ``time.sleep`` as a negative or NaN length and escape the retry loop."""
    import requests

    teacher = _teacher("http://127.0.0.1:9", backoff_s=0.5, max_backoff_s=4.0)
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = header
    for attempt in range(4):
        delay = teacher._delay(attempt, response)
        assert 0 <= delay <= 4.0 and delay >= min(0.5 * 2**attempt, 4.0) / 2
    response.headers["Retry-After"] = "2.5"
    assert teacher._delay(0, response) == 2.5
    response.headers["Retry-After"] = "600"
    assert teacher._delay(0, response) == 4.0  # capped


def _raw_post(base_url: str, headers: dict, body: bytes = b"") -> tuple[int, dict]:
    """One POST over a plain socket (headers as given, no client-side checks); status and JSON error body."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
        connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\n{head}\r\n".encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                next((line.split(b":")[1] for line in reply.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0")):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1] or b"{}")


def test_serve_teacher_answers_every_malformed_request_with_a_reason(monkeypatch):
    """The key is checked before the body is read, a body over the cap is refused unread, and every
    field of the wrong type gets a 400 naming it; the server keeps serving after each."""
    monkeypatch.setenv("TEACHER_KEY", "s3cret")
    good = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    with teacher_server("--require-key-env", "TEACHER_KEY", "--max-body-mb", "1", env={"TEACHER_KEY": "s3cret"}) as base_url:
        # A claimed gigabyte is never read: without the key, 401; with it, 413.
        assert _raw_post(base_url, {"Content-Length": str(10**9)})[0] == 401
        status, error = _raw_post(base_url, {**good, "Content-Length": str(10**9)})
        assert status == 413 and "at most 1048576" in error["error"]["message"]
        assert _raw_post(base_url, {**good, "Content-Length": "lots"})[0] == 400
        assert _raw_post(base_url, {**good, "Content-Length": "-5"})[0] == 400
        malformed = {
            b"[1, 2]": "must be a JSON object",
            b"{not json": "is not JSON",
            b'{"model": "title-facts", "messages": "hello"}': "'messages' must be a non-empty list",
            b'{"model": "title-facts", "messages": [1]}': "messages[0] must be an object",
            b'{"model": "title-facts", "messages": [{"role": "user", "content": 7}]}': "messages[0].content must be",
            b'{"model": "title-facts", "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}': "content[0].text",
            b'{"model": "title-facts", "messages": [{"role": "user", "content": "Title: x"}], "max_tokens": "abc"}': "'max_tokens'",
            b'{"model": "title-facts", "messages": [{"role": "user", "content": "Title: x"}], "max_tokens": -1}': "'max_tokens'",
            b'{"model": 5, "messages": [{"role": "user", "content": "Title: x"}]}': "'model' must be a string",
        }
        for body, reason in malformed.items():
            status, error = _raw_post(base_url, {**good, "Content-Length": str(len(body))}, body)
            assert status == 400 and reason in error["error"]["message"], (body, status, error)
        outputs = OpenAICompatibleTeacher(EndpointConfig(base_url=base_url, model="title-facts", revision="1", api_key_env="TEACHER_KEY"),
                                          read_image=None).annotate(pl.DataFrame({"listing_id": ["ssd-1"], "title": ["SanDisk 480GB SSD Plus"],
                                                                                  "description": [None], "image_uri": [None]}))
        assert json.loads(outputs[0]) == {"storage": "480 gb"}  # still serving
