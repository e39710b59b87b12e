"""``afmrl serve-teacher``: a small OpenAI-compatible chat-completions server.

It serves one of the project's own models, so that the HTTP teacher can be tried and tested
end to end without a GPU box:

- ``title-facts``: the rule-based reader of :func:`~afmrl_dagster.attributes.teacher.title_facts`
  applied to the ``Title:`` line of the prompt; it answers strict JSON.
- ``hf:<id or folder>``: a Hugging Face causal language model generating from the chat
  (its chat template when it has one), greedy; a tiny random model answers noise, which the
  caller records as invalid.
- ``hf-vlm:<id or folder>``: a Hugging Face image-text-to-text model (Qwen2-VL / Qwen2.5-VL,
  LLaVA, Idefics3 families) answering from the system text, the user text and the photo the
  user message attaches as an ``image_url`` data URI (``data:image/...;base64,...``), greedy.

``--require-key-env`` makes it demand ``Authorization: Bearer $THAT_VARIABLE``;
``--fail-first N --fail-status S`` answers the first N completions with status S (and
``Retry-After: 0`` for 429), to exercise a client's retries against a real socket.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ..attributes.teacher import title_facts

_TITLE_LINE = re.compile(r"^Title:\s*(.*)$", re.MULTILINE)


def _user_text(messages: list[dict]) -> str:
    """The text parts of the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(part.get("text", "") for part in content or [] if part.get("type") == "text")
    return ""


def title_facts_model(messages: list[dict], max_tokens: int) -> str:
    match = _TITLE_LINE.search(_user_text(messages))
    return json.dumps(title_facts(match.group(1) if match else ""), sort_keys=True)


def hf_model(name: str) -> Callable[[list[dict], int], str]:
    """Greedy generation with a Hugging Face causal LM (hub id or local folder), one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name).eval()
    lock = threading.Lock()

    def generate(messages: list[dict], max_tokens: int) -> str:
        chat = [{"role": m.get("role", "user"), "content": _user_text([m]) if m.get("role") == "user" else m.get("content", "")}
                for m in messages]
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in chat) + "\n", return_tensors="pt")["input_ids"]
        with lock, torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


# A request's body holds one photo as base64 (MAX_IMAGE_BYTES decoded) and the prompt.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
SOCKET_TIMEOUT_S = 30.0
MAX_TOKENS_LIMIT = 8192


class BadRequest(ValueError):
    """The request cannot be answered as sent (answered with 400 and this message)."""


_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(.*)$", re.DOTALL)
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def message_images(messages: list[dict]) -> list:
    """The photos (PIL images) the last user message attaches as ``image_url`` data URIs."""
    import io

    import PIL.Image

    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        images = []
        for part in content if isinstance(content, list) else []:
            if part.get("type") != "image_url":
                continue
            url = (part.get("image_url") or {}).get("url", "")
            match = _DATA_URI.match(url)
            if not match:
                raise BadRequest(f"image_url must be a data URI (data:image/...;base64,...); got {url[:40]!r}")
            if len(match.group(1)) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise BadRequest(f"image_url holds more than {MAX_IMAGE_BYTES} bytes")
            try:
                data = base64.b64decode(match.group(1), validate=True)
                image = PIL.Image.open(io.BytesIO(data))
                image.load()
            except (binascii.Error, OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
                raise BadRequest(f"image_url does not hold a decodable image: {error}") from error
            images.append(image.convert("RGB"))
        return images
    return []


def hf_vlm_model(name: str) -> Callable[[list[dict], int], str]:
    """Greedy generation with a Hugging Face image-text-to-text model (hub id or local folder),
    one request at a time, from the system text, the user text and the attached photo."""
    from ..attributes.hf_generator import HFAttributeGenerator, HFGeneratorConfig
    from ..attributes.json_constraint import MIN_NEW_TOKENS

    generator = HFAttributeGenerator.from_pretrained(HFGeneratorConfig(model=name, use_lora=False))
    lock = threading.Lock()

    def generate(messages: list[dict], max_tokens: int) -> str:
        system = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system" and isinstance(m.get("content"), str))
        images = message_images(messages)
        if len(images) > 1:
            raise BadRequest(f"one photo per request, got {len(images)}")
        if generator.config.constrained_json and max_tokens < MIN_NEW_TOKENS:
            raise BadRequest(f"max_tokens={max_tokens}: this teacher writes a constrained JSON object, which needs at least {MIN_NEW_TOKENS}")
        with lock:
            return generator.generate([images[0] if images else None], [_user_text(messages)], systems=[system],
                                      max_new_tokens=max_tokens)[0]

    return generate


class TeacherServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model_name: str, generate: Callable[[list[dict], int], str],
                 api_key: str | None = None, fail_first: int = 0, fail_status: int = 503,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        super().__init__(address, _Handler)
        self.model_name, self.generate, self.api_key = model_name, generate, api_key
        self.max_body_bytes = max_body_bytes
        self.fail_left, self.fail_status = fail_first, fail_status
        self.requests_served = 0
        self._lock = threading.Lock()

    def should_fail(self) -> bool:
        with self._lock:
            self.requests_served += 1
            if self.fail_left > 0:
                self.fail_left -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    server: TeacherServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S  # a client that stops sending (a Content-Length it never fills) frees its thread

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, no DNS lookups
        sys.stderr.write(f"serve-teacher: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._reply(status, {"error": {"message": message, "type": HTTPStatus(status).phrase}}, headers)

    def _authorised(self) -> bool:
        if self.server.api_key is None or self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._error(401, "missing or wrong API key")
        return False

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._reply(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            if self._authorised():
                self._reply(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}")

    def _refuse(self, status: int, message: str) -> None:
        """An error before the body was read: the connection closes, so unread bytes never pass for the next request."""
        self.close_connection = True
        self._error(status, message)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._refuse(404, f"no route {self.path}")
            return
        if self.server.api_key is not None and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._refuse(401, "missing or wrong API key")  # checked before a byte of the body is read
            return
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self._refuse(411 if self.headers.get("Content-Length") is None else 400, "a Content-Length header with the body's size is required")
            return
        if length < 0:
            self._refuse(400, f"Content-Length must be >= 0, got {length}")
            return
        if length > self.server.max_body_bytes:
            self._refuse(413, f"the body has {length} bytes; this server takes at most {self.server.max_body_bytes} (--max-body-mb)")
            return
        try:
            raw = self.rfile.read(length)
        except TimeoutError:  # the client stopped sending: drop it, nothing to answer
            sys.stderr.write(f"serve-teacher: dropped a client silent for {SOCKET_TIMEOUT_S:.0f} s mid-body\n")
            self.close_connection = True
            return
        if len(raw) < length:
            self._refuse(400, f"the body ended after {len(raw)} of {length} bytes")
            return
        try:
            messages, max_tokens, model = parse_completion_request(raw)
        except BadRequest as error:
            self._error(400, str(error))
            return
        if model != self.server.model_name:
            self._error(404, f"model {model!r} is not served here; this server serves {self.server.model_name!r}")
            return
        if self.server.should_fail():
            status = self.server.fail_status
            self._error(status, "injected failure", {"Retry-After": "0"} if status == 429 else None)
            return
        try:
            text = self.server.generate(messages, max_tokens)
        except BadRequest as error:
            self._error(400, str(error))
            return
        except Exception as error:  # the model failed: the client still gets an answer, and the server keeps serving
            sys.stderr.write(f"serve-teacher: generation failed: {type(error).__name__}: {error}\n")
            self._error(500, f"generation failed: {type(error).__name__}")
            return
        self._reply(200, {
            "id": f"chatcmpl-{self.server.requests_served}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        })


def parse_completion_request(raw: bytes) -> tuple[list[dict], int, str | None]:
    """``(messages, max_tokens, model)`` of a chat-completions body; :class:`BadRequest` naming the
    field for anything of the wrong type, so every malformed request gets a 400 with a reason."""
    try:
        request = json.loads(raw)
    except ValueError as error:
        raise BadRequest(f"the body is not JSON: {error}") from error
    if not isinstance(request, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(request).__name__}")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object, got {type(message).__name__}")
        if not isinstance(message.get("role", "user"), str):
            raise BadRequest(f"messages[{i}].role must be a string")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type", ""), str):
                    raise BadRequest(f"messages[{i}].content[{j}] must be an object with a string 'type'")
                if part.get("type") == "text" and not isinstance(part.get("text", ""), str):
                    raise BadRequest(f"messages[{i}].content[{j}].text must be a string")
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
    max_tokens = request.get("max_tokens", 256)
    if max_tokens is None:
        max_tokens = 256
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"field 'max_tokens' must be an integer in [1, {MAX_TOKENS_LIMIT}], got {max_tokens!r}")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"field 'model' must be a string, got {type(model).__name__}")
    return messages, max_tokens, model


def build_server(model: str, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 fail_first: int = 0, fail_status: int = 503, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> TeacherServer:
    if model == "title-facts":
        generate = title_facts_model
    elif model.startswith("hf:"):
        generate = hf_model(model[3:])
    elif model.startswith("hf-vlm:") and model[len("hf-vlm:"):].strip():
        generate = hf_vlm_model(model[len("hf-vlm:"):].strip())
    else:
        raise ValueError(f"unknown model {model!r}: use 'title-facts', 'hf:<id or folder>' or 'hf-vlm:<id or folder>'")
    return TeacherServer((host, port), model, generate, api_key, fail_first, fail_status, max_body_bytes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="title-facts", help="'title-facts', 'hf:<hub id or folder>' (a causal LM) or 'hf-vlm:<hub id or folder>' "
                        "(an image-text-to-text model that reads the attached photo) (default: title-facts)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--require-key-env", metavar="VAR", help="demand 'Authorization: Bearer $VAR'")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer the first N completions with --fail-status")
    parser.add_argument("--fail-status", type=int, default=503, metavar="S")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help=f"refuse (413) a request body larger than this (default {DEFAULT_MAX_BODY_BYTES // 2**20})")


def serve(args: argparse.Namespace) -> None:
    api_key = None
    if args.require_key_env:
        api_key = os.environ.get(args.require_key_env)
        if not api_key:
            raise SystemExit(f"afmrl serve-teacher: error: --require-key-env {args.require_key_env} but that variable is unset")
    if not args.max_body_mb > 0:
        raise SystemExit(f"afmrl serve-teacher: error: --max-body-mb must be > 0, got {args.max_body_mb}")
    server = build_server(args.model, args.host, args.port, api_key, args.fail_first, args.fail_status, int(args.max_body_mb * 2**20))
    host, port = server.server_address[:2]
    print(f"afmrl serve-teacher: serving {args.model} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
