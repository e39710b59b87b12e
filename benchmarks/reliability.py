"""Hostile inputs and operator faults, tried for real and counted.

Each bad input goes to the real entry point (the ``afmrl`` commands in process, a running
``afmrl serve-teacher`` over raw sockets, the catalog image check the ``raw_catalog`` asset
runs) and is classed as a *clear error* (refused with one line that names what is wrong: exit 2
and ``error:`` for a command, a 4xx JSON error for the server, a quarantine reason for a
listing), a *crash* (a traceback, a 5xx, no answer) or a *hang* (no answer within 60 s). Each
fault is done to real processes: writers SIGKILLed in the middle of an upload and racing on one
artefact, a training SIGKILLed and resumed, a registry that is not there. A fault is *survived*
when the run ends as it should (a clear error or the right result) and no stored object is lost
or left unverifiable.

    python benchmarks/reliability.py [--write-results docs/results.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from afmrl_dagster.readme import publish_result

BLOCK = "reliability"
HANG_SECONDS = 60


@dataclass
class Tally:
    category: str
    tried: int = 0
    clear: int = 0
    crashes: int = 0
    hangs: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, outcome: str, label: str, detail: str = "") -> None:
        self.tried += 1
        if outcome == "clear":
            self.clear += 1
            return
        if outcome == "hang":
            self.hangs += 1
        else:
            self.crashes += 1
        self.notes.append(f"{label}: {outcome} {detail[-300:]}")


def log(message: str) -> None:
    print(f"reliability: {message}", file=sys.stderr, flush=True)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def expired(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_command(argv: list[str], env: dict[str, str]) -> tuple[str, str]:
    """``afmrl ARGV`` in process with ``env`` set: (outcome, stderr)."""
    from afmrl_dagster.apps.cli import main

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    err = io.StringIO()
    try:
        with _deadline(HANG_SECONDS), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        return "crash", "accepted: exit 0"  # every input tried here is bad
    except SystemExit as done:
        text = err.getvalue()
        return ("clear" if done.code == 2 and "error:" in text and "Traceback" not in text else "crash"), text
    except _Timeout:
        return "hang", ""
    except BaseException as error:  # noqa: BLE001 - a crash is what is being counted
        return "crash", f"{type(error).__name__}: {error}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _catalog(folder: Path, change=None) -> str:
    from afmrl_dagster.evaluation.protocols import builtin_or_parquet

    catalog, _ = builtin_or_parquet("builtin:families=2,siblings=2,listings=2,lines=mugs")
    catalog = change(catalog) if change else catalog
    folder.mkdir(parents=True, exist_ok=True)
    catalog.with_columns(pl.col("image_uri").fill_null("")).write_parquet(folder / "mugs.parquet")
    return f"parquet:{folder}"


def _first_image(uri: str):
    return lambda frame: frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(uri)).otherwise(pl.col("image_uri")).alias("image_uri"))


def command_inputs(work: Path) -> list[tuple[str, list[str], dict]]:
    """(label, argv, environment) of every bad command line tried."""
    out = str(work / "m.json")
    good = _catalog(work / "good")
    (work / "not-parquet").mkdir()
    (work / "not-parquet" / "mugs.parquet").write_text("listing_id,title\n1,mug\n")
    (work / "empty").mkdir()
    (work / "a-file").write_text("")
    (work / "notes.txt").write_text("not an image")
    (work / "empty-store").mkdir()
    fifo = work / "photo.fifo"
    os.mkfifo(fifo)
    port = _closed_port()
    evaluate = [
        ("evaluate: folder that does not exist", ["--catalog", f"parquet:{work / 'nowhere'}"]),
        ("evaluate: empty folder", ["--catalog", f"parquet:{work / 'empty'}"]),
        ("evaluate: file that is not parquet", ["--catalog", f"parquet:{work / 'not-parquet'}"]),
        ("evaluate: every product_id null",
         ["--catalog", _catalog(work / "null-products", lambda f: f.with_columns(pl.lit(None, pl.Utf8).alias("product_id")))]),
        ("evaluate: a listing id twice", ["--catalog", _catalog(work / "twice", lambda f: pl.concat([f, f.head(1)]))]),
        ("evaluate: blank titles", ["--catalog", _catalog(work / "blank", lambda f: f.with_columns(pl.lit("  ").alias("title")))]),
        ("evaluate: unknown catalog kind", ["--catalog", "nosuchloader:/tmp"]),
        ("evaluate: spec without a location", ["--catalog", "parquet:"]),
        ("evaluate: --split on a parquet catalog", ["--catalog", good, "--split", "train.txt"]),
        ("evaluate: --limit 0", ["--catalog", good, "--limit", "0"]),
        ("evaluate: --limit -3", ["--catalog", good, "--limit", "-3"]),
        ("evaluate: unknown encoder", ["--catalog", good, "--encoder", "no-such-encoder"]),
        ("evaluate: encoder folder that does not exist", ["--catalog", good, "--encoder", str(work / "no-model")]),
        ("evaluate: champion of an empty store", ["--catalog", good, "--encoder", "champion"]),
        ("evaluate: --out is a folder", ["--catalog", good], str(work)),
        ("evaluate: --out under a file", ["--catalog", good], str(work / "a-file" / "m.json")),
        ("evaluate: image /etc/passwd", ["--catalog", _catalog(work / "passwd", _first_image("/etc/passwd"))]),
        ("evaluate: image file:///etc/passwd", ["--catalog", _catalog(work / "file-uri", _first_image("file:///etc/passwd"))]),
        ("evaluate: image ../ escape", ["--catalog", _catalog(work / "escape", _first_image(f"{work}/escape/../notes.txt"))]),
        ("evaluate: image /dev/zero", ["--catalog", _catalog(work / "zero", _first_image("/dev/zero"))]),
        ("evaluate: image in another bucket", ["--catalog", _catalog(work / "bucket", _first_image("s3://someone-else/a.jpg"))]),
        ("evaluate: image over http", ["--catalog", _catalog(work / "http", _first_image("http://example.com/a.jpg"))]),
    ]
    cases = []
    for label, arguments, *destination in evaluate:
        cases.append((label, ["evaluate", *arguments, "--out", destination[0] if destination else out],
                      {"AFMRL_STORE": str(work / "empty-store")}))
    store = {"AFMRL_STORE": str(work / "empty-store")}
    cases += [
        ("search: neither image nor text", ["search"], store),
        ("search: image that does not exist", ["search", "--image", str(work / "nope.jpg")], store),
        ("search: image is a folder", ["search", "--image", str(work)], store),
        ("search: image is /dev/zero", ["search", "--image", "/dev/zero"], store),
        ("search: image is a FIFO", ["search", "--image", str(fifo)], store),
        ("search: image is a text file", ["search", "--image", str(work / "notes.txt"), "--text", "mug"], store),
        ("search: store without a serving record", ["search", "--text", "mug"], store),
        ("search: store in a bucket that does not exist", ["search", "--text", "mug"],
         {"AFMRL_STORE": "s3://no-such-bucket/afmrl", "AFMRL_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}),
        ("search: sensor interval 0", ["search", "--text", "mug"], {**store, "AFMRL_SENSOR_INTERVAL_SECONDS": "0"}),
        ("rollback: registry not answering", ["rollback", "--tracking-uri", f"http://127.0.0.1:{port}"], {}),
        ("rollback: model never registered", ["rollback", "--model", "no-such-model", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"], {}),
    ]
    return cases


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def try_commands(work: Path) -> Tally:
    tally = Tally("command lines (`afmrl evaluate`, `search`, `rollback`)")
    quiet = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    for label, argv, env in command_inputs(work):
        outcome, text = run_command(argv, {**quiet, **env} if argv[0] == "rollback" else env)
        tally.add(outcome, label, text)
        log(f"{label}: {outcome}")
    return tally


def _raw_post(base_url: str, headers: dict, body: bytes = b"") -> tuple[int | None, bytes]:
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    try:
        with socket.create_connection((url.hostname, url.port), timeout=HANG_SECONDS) as connection:
            connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\nConnection: close\r\n{head}\r\n".encode() + body)
            reply = b""
            while chunk := connection.recv(65536):
                reply += chunk
    except socket.timeout:
        return None, b"timeout"
    if not reply:
        return None, b""
    return int(reply.split(b" ", 2)[1]), reply.split(b"\r\n\r\n", 1)[-1]


def try_http(work: Path) -> Tally:
    tally = Tally("HTTP requests to `afmrl serve-teacher`")
    env = {**os.environ, "TEACHER_KEY": "s3cret"}
    process = subprocess.Popen([sys.executable, "-m", "afmrl_dagster.apps.cli", "serve-teacher", "--port", "0", "--require-key-env",
                                "TEACHER_KEY", "--max-body-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        base_url = None
        while base_url is None and process.poll() is None:
            found = re.search(r"serving (\S+) on (http://\S+/v1)", process.stdout.readline())
            base_url = found.group(2) if found else None
        key = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        requests_ = [
            ("no key, 1 GB claimed", {"Content-Length": str(10**9)}, b""),
            ("wrong key", {"Authorization": "Bearer nope", "Content-Length": "2"}, b"{}"),
            ("1 GB claimed", {**key, "Content-Length": str(10**9)}, b""),
            ("Content-Length not a number", {**key, "Content-Length": "lots"}, b""),
            ("negative Content-Length", {**key, "Content-Length": "-5"}, b""),
        ]
        bodies = [b"[1, 2]", b"{not json", b'{"model": "title-facts", "messages": "hello"}', b'{"model": "title-facts", "messages": [1]}',
                  b'{"model": "title-facts", "messages": [{"role": "user", "content": 7}]}',
                  b'{"model": "title-facts", "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
                  b'{"model": "title-facts", "messages": [{"role": "user", "content": "Title: x"}], "max_tokens": "abc"}',
                  b'{"model": "title-facts", "messages": [{"role": "user", "content": "Title: x"}], "max_tokens": -1}',
                  b'{"model": 5, "messages": [{"role": "user", "content": "Title: x"}]}', b'{"model": "title-facts"}', b"\xff\xfe"]
        requests_ += [(f"body {body[:40]!r}", {**key, "Content-Length": str(len(body))}, body) for body in bodies]
        for label, headers, body in requests_:
            status, reply = _raw_post(base_url, headers, body)
            clear = status is not None and 400 <= status < 500 and b'"error"' in reply
            tally.add("clear" if clear else ("hang" if reply == b"timeout" else "crash"), label, f"{status} {reply[:200]!r}")
            log(f"HTTP {label}: {status}")
    finally:
        process.kill()
        process.wait(timeout=30)
    return tally


def try_catalog_images(work: Path) -> Tally:
    """Image URIs a catalog might carry, through the check ``raw_catalog`` runs: each must be
    quarantined with a reason, and nothing outside the image root read."""
    from afmrl_dagster.catalog.ingest import find_image_problems
    from afmrl_dagster.storage import UriRoots, read_uri_bytes

    tally = Tally("catalog image URIs (`raw_catalog`, quarantined by listing)")
    root = work / "images"
    root.mkdir()
    (work / "secret.jpg").write_bytes(b"secret")
    os.symlink(work / "secret.jpg", root / "link.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "folder.jpg").mkdir()
    Image.new("L", (12000, 12000), 0).save(root / "bomb.png", format="PNG")
    (root / "huge.jpg").write_bytes(b"\xff\xd8" + b"\0" * (33 * 1024 * 1024))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 20, 20)).save(buffer, format="JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "empty.jpg").write_bytes(b"")
    (root / "tiny.png").write_bytes(_png(2, 2))
    (root / "text.jpg").write_text("not an image")
    uris = ["/etc/passwd", "file:///etc/passwd", f"{root}/../secret.jpg", str(root / "link.jpg"), "s3://someone-else/a.jpg", "/dev/zero",
            "http://example.com/a.jpg", str(root / "pipe.jpg"), str(root / "folder.jpg"), str(root / "bomb.png"), str(root / "huge.jpg"),
            str(root / "truncated.jpg"), str(root / "empty.jpg"), str(root / "tiny.png"), str(root / "text.jpg"), str(root / "missing.jpg")]
    frame = pl.DataFrame({"listing_id": [f"l{i}" for i in range(len(uris))], "image_uri": uris})
    read = []
    with _deadline(HANG_SECONDS):
        problems = {issue["listing_id"]: issue["problem"] for issue in
                    find_image_problems(frame, lambda uri: read.append(uri) or read_uri_bytes(uri), UriRoots([str(root)]))}
    outside = set(uris[:7])
    for i, uri in enumerate(uris):
        ok = f"l{i}" in problems and not (uri in outside and uri in read)
        tally.add("clear" if ok else "crash", uri, problems.get(f"l{i}", "accepted"))
    return tally


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


WRITER = """
import sys
from afmrl_dagster.storage import open_store
open_store(sys.argv[1]).upload_directory(sys.argv[2], sys.argv[3])
"""


def _folder(path: Path, label: str, shards: int = 0) -> Path:
    (path / "weights").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"writer": label}))
    for i in range(shards):
        (path / "weights" / f"shard-{i}.bin").write_bytes(os.urandom(24 * 1024 * 1024))
    return path


def try_faults(work: Path, rounds: int = 3) -> Tally:
    from afmrl_dagster.storage import TEMP_SUFFIX, StorageError, open_store

    tally = Tally("faults (SIGKILL, racing writers, registry gone)")
    location = str(work / "store")
    store = open_store(location)

    def verified(prefix: str, into: str) -> str | None:
        try:
            return json.loads((store.download_directory(prefix, work / into) / "config.json").read_text())["writer"]
        except (StorageError, OSError, ValueError):
            return None

    for round_ in range(rounds):  # a writer killed mid-upload: the previous version survives, whole
        prefix = f"models/killed-{round_}"
        store.upload_directory(_folder(work / f"a{round_}", "A"), prefix)
        process = subprocess.Popen([sys.executable, "-c", WRITER, location, str(_folder(work / f"b{round_}", "B", shards=3)), prefix],
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and not any(key.endswith("shard-0.bin") for key in store.list_keys(f"{prefix}/versions/")):
            time.sleep(0.01)
        process.kill()
        process.wait()
        survived = verified(prefix, f"after-kill-{round_}") == "A"
        for label in ("C", "D"):
            store.upload_directory(_folder(work / f"{label}{round_}", label), prefix)
        left = list(Path(store.uri(prefix)).rglob(f"*{TEMP_SUFFIX}"))
        tally.add("clear" if survived and verified(prefix, f"after-d-{round_}") == "D" and not left else "crash",
                  f"writer killed mid-upload (round {round_})", f"left {left}")
        tally.lost += 0 if survived else 1
    folders = [_folder(work / f"w{i}", f"w{i}", shards=1) for i in range(2)]
    for round_ in range(rounds):  # two writer processes on one prefix at once
        processes = [subprocess.Popen([sys.executable, "-c", WRITER, location, str(folder), "models/race"], stderr=subprocess.PIPE)
                     for folder in folders]
        codes = [process.wait() for process in processes]
        who = verified("models/race", f"race-{round_}")
        tally.add("clear" if codes == [0, 0] and who in ("w0", "w1") else "crash", f"two writers racing (round {round_})", str(codes))
        tally.lost += 0 if who else 1
    tally.add(*_training_killed_and_resumed(work))
    from afmrl_dagster.promotion import RegistryError, alias_version
    from mlflow.tracking import MlflowClient

    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        with _deadline(HANG_SECONDS):
            alias_version(MlflowClient(tracking_uri=f"http://127.0.0.1:{_closed_port()}"), "afmrl-encoder", "champion")
        tally.add("crash", "promotion gate, registry gone", "read as no champion")
    except RegistryError:
        tally.add("clear", "promotion gate, registry gone")
    except _Timeout:
        tally.add("hang", "promotion gate, registry gone")
    return tally


TRAINING = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from reliability import training_data
from afmrl_dagster.training.encoder_training import train_encoder
features, products, lines, texts, config = training_data(sys.argv[1])
train_encoder(features, products, lines, texts, config)
"""


def training_data(checkpoint_dir: str | None):
    from afmrl_dagster.encoders.dual_tower import ListingFeatures
    from afmrl_dagster.training.encoder_training import EncoderTrainingConfig

    rng = np.random.default_rng(0)
    n = 240
    products = [f"p{i // 3}" for i in range(n)]
    lines = [f"line{i // 60}" for i in range(n)]
    features = ListingFeatures([f"x{i}" for i in range(n)], rng.normal(size=(n, 32)).astype(np.float32), np.ones(n, bool),
                               rng.normal(size=(n, 16)).astype(np.float32))
    config = EncoderTrainingConfig(epochs=60, batch_size=16, seed=3, checkpoint_dir=checkpoint_dir, checkpoint_every_steps=1,
                                   head={"embed_dim": 16, "hidden_dim": 32})
    return features, products, lines, [f"kind: {p}" for p in products], config


def _training_killed_and_resumed(work: Path) -> tuple[str, str, str]:
    import torch

    from afmrl_dagster.training.checkpoints import checkpoint_step
    from afmrl_dagster.training.encoder_training import train_encoder

    folder = work / "checkpoints"
    process = subprocess.Popen([sys.executable, "-c", TRAINING, str(folder), str(Path(__file__).parent)], stderr=subprocess.PIPE)
    while process.poll() is None and (checkpoint_step(folder) or 0) < 20:
        time.sleep(0.02)
    process.kill()
    process.wait()
    killed_at = checkpoint_step(folder) or 0
    resumed = train_encoder(*training_data(str(folder))).head.state_dict()
    whole = train_encoder(*training_data(None)).head.state_dict()
    same = killed_at >= 20 and all(torch.equal(resumed[name], whole[name]) for name in whole)
    return ("clear" if same else "crash"), f"training SIGKILLed at step {killed_at}, resumed", "weights differ from the uninterrupted run"


def table(tallies: list[Tally]) -> str:
    lines = ["| what was tried | tried | clear error / survived | crashes | hangs | objects lost |", "|---|---|---|---|---|---|"]
    for t in tallies:
        lines.append(f"| {t.category} | {t.tried} | {t.clear} | {t.crashes} | {t.hangs} | {t.lost} |")
    total = Tally("**all**", *(sum(getattr(t, name) for t in tallies) for name in ("tried", "clear", "crashes", "hangs", "lost")))
    lines.append(f"| {total.category} | {total.tried} | {total.clear} | {total.crashes} | {total.hangs} | {total.lost} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each writer fault (default 3)")
    parser.add_argument("--write-results", metavar="FILE", help=f"replace the {BLOCK} block of this file with the table")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tallies = []
        for name, attempt in (("commands", try_commands), ("http", try_http), ("catalog", try_catalog_images),
                              ("faults", lambda folder: try_faults(folder, args.rounds))):
            (work / name).mkdir()
            began = time.perf_counter()
            tallies.append(attempt(work / name))
            log(f"{name}: {time.perf_counter() - began:.0f} s")
    for tally in tallies:
        for note in tally.notes:
            log(f"NOT CLEAR: {note}")
    text = (f"Tried by `benchmarks/reliability.py` in {time.perf_counter() - started:.0f} s on this machine. A *clear error* is a refusal "
            "in one line naming the input (exit 2 and `error:`, a 4xx JSON error, a quarantine reason naming the listing); a fault is "
            "*survived* when the previous artefact still downloads and verifies, the racing writers both finish with one verifying "
            "version, the resumed training ends with the weights of the run never stopped, and a missing registry stops the gate.\n\n"
            + table(tallies))
    status = publish_result(text, args.write_results, BLOCK)
    return status or (1 if any(t.crashes or t.hangs or t.lost for t in tallies) else 0)


if __name__ == "__main__":
    raise SystemExit(main())
