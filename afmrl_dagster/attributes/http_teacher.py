"""A teacher served elsewhere behind an OpenAI-compatible chat-completions endpoint (vLLM,
TGI, llama.cpp, a hosted API).

One request per listing (the photo attached as a data URL when the listing has one), a
bounded number in flight, a timeout per request, and retries with exponential backoff and
jitter on connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``). An answer
that is not the JSON asked for is returned as it is: parsing and recording it as invalid is
the caller's job (:func:`~afmrl_dagster.attributes.teacher.attribute_table`). A request that
still fails after its retries, or one the server refuses (401, 403, 404, 400), raises
:class:`TeacherEndpointError` naming the listing.
"""

from __future__ import annotations

import base64
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import polars as pl
import requests

from ..settings import TEACHER_API_KEY_ENV
from .prompts import TEACHER_PROMPT, PromptTemplate

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


class TeacherEndpointError(RuntimeError):
    """The endpoint could not annotate a listing; the message names it and the cause."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where the teacher is served and how hard to press it."""

    base_url: str  # e.g. http://gpu-box:8000/v1
    model: str  # the served model name
    revision: str = ""  # recorded in the cache key: bump it when the served weights change
    api_key_env: str = TEACHER_API_KEY_ENV  # read at call time; unset = no Authorization header
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_tokens: int = 256
    temperature: float = 0.0
    send_images: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout_s > 0")


def _image_part(data: bytes) -> dict:
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"}}


class OpenAICompatibleTeacher:
    """An :class:`~afmrl_dagster.attributes.teacher.AttributeTeacher` over HTTP."""

    name = "openai-compatible"

    def __init__(
        self,
        config: EndpointConfig,
        prompt: PromptTemplate = TEACHER_PROMPT,
        read_image: Callable[[str], bytes] | None = None,
        keys: set[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config, self.prompt, self.read_image, self.keys = config, prompt, read_image, keys
        self._sleep = sleep
        self._local = threading.local()

    @property
    def version(self) -> str:
        return f"{self.config.model}@{self.config.revision or 'unversioned'}+{self.prompt.id}"

    @property
    def cache_identity(self) -> str:
        keys = ",".join(sorted(self.keys)) if self.keys else "free-keys"
        return f"{self.name}:{self.version}:{keys}:images={self.config.send_images and self.read_image is not None}"

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _messages(self, row: dict) -> list[dict]:
        text = self.prompt.render(row.get("title") or "", row.get("description"), self.keys)
        content: list[dict] = [{"type": "text", "text": text}]
        uri = row.get("image_uri")
        if uri and self.read_image is not None and self.config.send_images:
            content.insert(0, _image_part(self.read_image(uri)))
        return [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": content}]

    def _delay(self, attempt: int, response: requests.Response | None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = math.nan  # an HTTP date or junk: the backoff below
            if math.isfinite(seconds) and seconds >= 0:  # "-1", "nan", "inf" fall back to the backoff too
                return min(seconds, self.config.max_backoff_s)
        base = min(self.config.backoff_s * 2**attempt, self.config.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter spreads clients that failed together

    def complete(self, listing_id: str, messages: list[dict]) -> str:
        """The assistant text for ``messages``, with retries; raises naming ``listing_id``."""
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.config.model, "messages": messages, "max_tokens": self.config.max_tokens,
                "temperature": self.config.temperature}
        problem = ""
        for attempt in range(self.config.max_retries + 1):
            response = None
            try:
                response = self._session().post(url, json=body, headers=headers, timeout=self.config.timeout_s)
            except requests.Timeout:
                problem = f"no answer within {self.config.timeout_s:g} s"
            except requests.ConnectionError as error:
                problem = f"cannot connect to {self.config.base_url}: {error.__class__.__name__}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as error:
                        raise TeacherEndpointError(
                            f"listing {listing_id!r}: {url} answered 200 without choices[0].message.content ({error!r}): "
                            f"{response.text[:300]!r}") from None
                problem = f"HTTP {response.status_code}: {response.text[:300]!r}"
                if response.status_code in (401, 403):
                    raise TeacherEndpointError(f"listing {listing_id!r}: {url} refused the credentials ({problem}); "
                                               f"check ${self.config.api_key_env}")
                if response.status_code not in RETRIED_STATUS:
                    raise TeacherEndpointError(f"listing {listing_id!r}: {url} rejected the request ({problem})")
            if attempt < self.config.max_retries:
                self._sleep(self._delay(attempt, response))
        raise TeacherEndpointError(f"listing {listing_id!r}: {url} failed {self.config.max_retries + 1} times; last: {problem}")

    def _answer(self, row: dict) -> str:
        # The image is read and encoded here, in the worker: at most ``concurrency`` images are
        # in memory at once, however many listings the chunk holds.
        return self.complete(row["listing_id"], self._messages(row))

    def annotate(self, listings: pl.DataFrame) -> list[str]:
        """One raw answer per row, in order, at most ``concurrency`` requests (and images) in flight."""
        rows = listings.to_dicts()
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="teacher") as pool:
            futures = [pool.submit(self._answer, row) for row in rows]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
