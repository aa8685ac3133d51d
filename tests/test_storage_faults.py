"""Object storage that misbehaves: the S3 test endpoint behind a fault-injecting proxy
(tests/s3_fault_proxy.py: 500 InternalError, 503 SlowDown, dropped connections, latency).
Every storage path completes through retries, each test asserts faults really happened, and
an unreachable endpoint fails within a bounded time with one line naming it."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from loopback import TEST_KEY_ID, TEST_SECRET, free_port
from s3_fault_proxy import S3FaultProxy

from data_pipelines.settings import PreprocessSettings, ShapesSettings
from data_pipelines.shapes import build_shapes
from data_pipelines.storage import endpoint_label, resolve, s3_filesystem

UNREACHABLE_BOUND_S = 60  # not a benchmark: only proves a dead endpoint cannot hang us


def _blob(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


# --- the proxy itself: it forwards requests unchanged and each fault kind really happens ---

class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = json.dumps({"method": self.command, "path": self.path,
                              "headers": list(self.headers.items()),
                              "body": body.hex()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def echo_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _put(url: str, path: str, body: bytes, headers: dict, chunked: bool = False):
    host, port = url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body), 7):
                piece = body[start:start + 7]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_proxy_forwards_signed_requests_unchanged_and_injects_each_fault_kind(echo_upstream):
    signed = {"Host": "127.0.0.1:9", "X-Amz-Date": "20260101T000000Z",
              "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
              "Authorization": "AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/s3/aws4_request"}
    body = bytes(range(256)) * 3
    with S3FaultProxy(echo_upstream, fault_rate=0.0, latency_rate=0.0) as proxy:
        for chunked in (False, True):
            status, payload = _put(proxy.url, "/bucket/a%20key?partNumber=1", body, signed,
                                   chunked=chunked)
            seen = json.loads(payload)
            assert status == 200 and seen["method"] == "PUT"
            assert seen["path"] == "/bucket/a%20key?partNumber=1"
            assert bytes.fromhex(seen["body"]) == body
            # the client's headers arrive as sent, in order, Host included (SigV4 signs it)
            forwarded = [(k, v) for k, v in seen["headers"] if k.lower() in
                         {h.lower() for h in signed}]
            assert forwarded == list(signed.items())
        assert proxy.counts()["forwarded"] == 2 and proxy.injected() == 0

    for kind, status, code in (("http_500", 500, b"<Code>InternalError</Code>"),
                               ("http_503", 503, b"<Code>SlowDown</Code>")):
        with S3FaultProxy(echo_upstream, fault_rate=1.0, latency_rate=0.0,
                          faults=(kind,)) as proxy:
            got_status, payload = _put(proxy.url, "/bucket/key", body, signed)
            assert (got_status, code in payload) == (status, True)
            assert b"<Resource>/bucket/key</Resource>" in payload
            assert proxy.counts()[kind] == 1 and proxy.counts()["forwarded"] == 0
    with S3FaultProxy(echo_upstream, fault_rate=1.0, latency_rate=0.0,
                      faults=("dropped",)) as proxy:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            _put(proxy.url, "/bucket/key", body, signed)
        assert proxy.counts()["dropped"] == 1
    with S3FaultProxy(echo_upstream, fault_rate=0.0, latency_rate=1.0,
                      latency_s=(0.3, 0.3)) as proxy:
        start = time.monotonic()
        assert _put(proxy.url, "/bucket/key", body, signed)[0] == 200
        assert time.monotonic() - start >= 0.3 and proxy.counts()["delayed"] == 1
    with S3FaultProxy(echo_upstream, latency_rate=0.0, faults=("http_500",),
                      fail_first=2) as proxy:
        statuses = [_put(proxy.url, path, body, signed)[0]
                    for path in ("/b/1", "/b/1", "/b/2", "/b/1", "/b/2", "/b/2")]
        assert statuses == [500, 500, 500, 200, 500, 200]


# --- the storage layer, Ray Data, checkpoints and the embedding job through ~10% faults ---

def test_storage_layer_writes_lists_and_reads_through_faults(faulty_s3_endpoint, s3_bucket):
    rng = random.Random(0)
    root = resolve(f"{s3_bucket}/shards")
    expected = {f"train/part-{i:05d}.tar": _blob(rng, rng.choice((100, 20_000, 200_000)))
                for i in range(8)}
    for name, data in expected.items():
        root.join(name).write_bytes(data)
    root.join("manifest.json").write_text(json.dumps({"shards": sorted(expected)}))

    bucket_path = root.path
    assert root.list_files() == sorted(
        [f"{bucket_path}/{name}" for name in expected] + [f"{bucket_path}/manifest.json"])
    for name, data in expected.items():
        location = root.join(name)
        assert location.exists() and location.read_bytes() == data
    assert json.loads(root.join("manifest.json").read_text())["shards"] == sorted(expected)
    root.join("train/part-00000.tar").delete()
    assert not root.join("train/part-00000.tar").exists()

    counts = faulty_s3_endpoint.counts()
    assert faulty_s3_endpoint.injected() >= 1, counts  # the retries really were needed
    assert counts["requests"] > counts["forwarded"] >= 8 * 3, counts


def test_filesystem_shipped_to_ray_workers_keeps_its_retries(faulty_s3_endpoint, s3_bucket):
    """Ray Data and Ray Train pickle the filesystem into their workers. pyarrow's own pickle
    drops the retry strategy (3 attempts by default); ours rebuilds it with
    S3_MAX_ATTEMPTS, so a request that fails 3 times still succeeds on its 4th attempt."""
    import pickle

    from data_pipelines.storage import S3_MAX_ATTEMPTS, _s3_filesystem

    assert S3_MAX_ATTEMPTS >= 4
    original = s3_filesystem()
    key = f"{s3_bucket[len('s3://'):]}/probe.json"
    resolve(f"s3://{key}").write_text("{}")
    shipped = pickle.dumps(original)
    _s3_filesystem.cache_clear()  # as in a fresh worker process: rebuilt, not reused
    copy = pickle.loads(shipped)
    assert copy is not original and copy.equals(original)
    before = faulty_s3_endpoint.counts()["http_503"]
    faulty_s3_endpoint.fail_first, faulty_s3_endpoint.faults = 3, ("http_503",)
    assert copy.get_file_info(key).size == 2
    assert faulty_s3_endpoint.counts()["http_503"] - before == 3


def test_small_object_read_survives_an_error_body_larger_than_the_object(
        faulty_s3_endpoint, s3_bucket):
    """The AWS SDK writes an error response's XML into pyarrow's object-sized read buffer:
    for objects smaller than that XML the read fails "Failed to flush response stream", an
    error the SDK does not retry. Location.read_bytes retries it."""
    done = resolve(f"{s3_bucket}/run/clip/portable/DONE.json")
    done.write_text('{"step": 8}')  # 11 bytes, less than any S3 error document
    faulty_s3_endpoint.fail_first = 1  # the HEAD and the GET each fail once, then pass
    faulty_s3_endpoint.faults = ("http_500", "http_503")
    assert done.read_text() == '{"step": 8}'
    assert done.read_text() == '{"step": 8}'  # same requests again: no faults now
    counts = faulty_s3_endpoint.counts()
    assert counts["http_500"] + counts["http_503"] >= 2, counts


def test_ray_data_stream_reads_every_sample_once_through_faults(
        ray_session, faulty_s3_endpoint, s3_bucket):
    from data_pipelines.streaming import image_caption_dataset

    uri = f"{s3_bucket}/shapes"
    # rendered here, in the test process: the writes go through the proxy (~10% faults)
    build_shapes(uri, ShapesSettings(train_size=64, test_size=4, samples_per_shard=16),
                 use_ray=False)
    built = faulty_s3_endpoint.counts()
    assert faulty_s3_endpoint.injected() >= 1, built
    # the read: planned here, shards read by Ray Data tasks in Ray workers with the
    # filesystem object shipped from here. Every distinct request fails once (deterministic):
    # the read completes only if the workers' copies retry too
    faulty_s3_endpoint.fail_first = 1
    dataset = image_caption_dataset(uri, "train", PreprocessSettings(image_size=32,
                                                                     context_length=16))
    keys = [str(key) for batch in dataset.iter_batches(batch_size=32, batch_format="numpy")
            for key in batch["key"]]
    assert Counter(keys) == Counter(f"train-{i:07d}" for i in range(64))
    after = faulty_s3_endpoint.counts()
    streamed = after["requests"] - built["requests"]
    injected = sum(after[k] - built[k] for k in ("http_500", "http_503", "dropped"))
    assert streamed >= 2 * 4 and injected >= 4, after  # 4 shards, each fetched after a fault


def _checkpoint_tree(root: Path, rng: random.Random) -> dict[str, bytes]:
    """A DeepSpeed-style checkpoint folder: per-rank model/optimizer states, metadata and
    the portable export."""
    files = {"portable/config.json": b'{"component": "clip"}',
             "portable/weights.safetensors": _blob(rng, 400_000),
             "checkpoint_meta.json": json.dumps({"step": 4}).encode(), "latest": b"global_step4"}
    for rank in range(2):
        files[f"global_step4/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = _blob(
            rng, 150_000)
        files[f"global_step4/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = _blob(
            rng, 20_000)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_checkpoint_upload_and_download_through_faults(faulty_s3_endpoint, s3_bucket, tmp_path):
    """What Ray Train does with the `storage_filesystem` that training_job._storage() gives
    it (s3_filesystem()): upload a checkpoint folder with pyarrow.fs.copy_files (threads off
    for S3 uploads, as Ray does), restore it with Checkpoint.to_directory().

    The downloads go through retry_misfiled_transient: the checkpoint's small files
    (`latest`, config.json) are smaller than an S3 error document, and a 500/503 on their
    GET is an error the AWS SDK does not retry (see data_pipelines.storage)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from data_pipelines.storage import retry_misfiled_transient

    filesystem = s3_filesystem()
    expected = _checkpoint_tree(tmp_path / "local", random.Random(1))
    remote = f"{s3_bucket[len('s3://'):]}/runs/faults/clip/checkpoint_000001"
    pyarrow.fs.copy_files(str(tmp_path / "local"), remote, destination_filesystem=filesystem,
                          use_threads=False, chunk_size=64 * 1024 * 1024)
    uploaded = faulty_s3_endpoint.counts()
    assert uploaded["requests"] > uploaded["forwarded"], uploaded  # faults during the upload

    retry_misfiled_transient(lambda: pyarrow.fs.copy_files(
        remote, str(tmp_path / "copied"), source_filesystem=filesystem))
    assert _tree(tmp_path / "copied") == expected
    restored = retry_misfiled_transient(lambda: Checkpoint(
        path=remote, filesystem=filesystem).to_directory(str(tmp_path / "restored")))
    assert _tree(Path(restored)) == expected
    counts = faulty_s3_endpoint.counts()
    assert faulty_s3_endpoint.injected() >= 2, counts
    assert counts["requests"] - uploaded["requests"] > 2 * len(expected), counts


@pytest.mark.slow  # ~30 s here, most of it the embedding actors starting (torch, CLIP)
def test_embedding_job_through_faults(ray_session, faulty_s3_endpoint, s3_bucket, tmp_path):
    """`unclip embed` with the dataset and the embeddings on S3 behind the proxy: the driver's
    manifest reads and writes, the Ray Data shard reads and Parquet writes in the workers,
    the listing and row count of the written shards. (The CLIP weights are local: the
    embedding actors resolve them from their own environment, which names the direct
    endpoint.)"""
    import pyarrow.parquet as pq
    from stage_fixtures import fast_config, save_trained_clip

    from orchestration.common.layout import DONE_FILE, portable_uri
    from orchestration.train.embed_job import run_embed

    config = fast_config(tmp_path, f"data.uri={s3_bucket}/shapes",
                         "data.shapes.train_size=48", "data.shapes.test_size=16",
                         "data.shapes.samples_per_shard=24")
    build_shapes(config.data.uri, config.data.shapes, use_ray=False)
    save_trained_clip(config)  # untrained weights are enough to embed with
    resolve(portable_uri(config, "clip")).join(DONE_FILE).write_text('{"step": 0}')
    before = faulty_s3_endpoint.counts()
    manifest = run_embed(config, log=lambda *_: None)
    after = faulty_s3_endpoint.counts()

    assert {split: entry["num_samples"] for split, entry in manifest["splits"].items()} == {
        "train": 48, "test": 16}
    out = resolve(config.data.resolved_embeddings_uri)
    keys = [key for path in out.join("train").list_files() if path.endswith(".parquet")
            for key in pq.read_table(out.filesystem.open_input_file(path)).column("key")
            .to_pylist()]
    assert Counter(keys) == Counter(f"train-{i:07d}" for i in range(48))
    assert json.loads(out.join("manifest.json").read_text())["splits"] == manifest["splits"]
    # ~100 requests at 10%: no fault at all would be a 1-in-30,000 run
    injected = sum(after[k] - before[k] for k in ("http_500", "http_503", "dropped"))
    assert after["requests"] - before["requests"] >= 50 and injected >= 1, after


# --- a permanently unreachable endpoint ---

def test_unreachable_endpoint_fails_fast_with_one_line_naming_it(s3_endpoint, monkeypatch,
                                                                 run_cli):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    uri = "s3://some-bucket/shapes"

    start = time.monotonic()
    code, _, err = run_cli("data", "inspect", uri)
    elapsed = time.monotonic() - start
    assert elapsed < UNREACHABLE_BOUND_S, elapsed
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot reach the S3 endpoint {dead} for {uri}"), err
    assert TEST_SECRET not in err and TEST_KEY_ID not in err
    # an endpoint is named by scheme, host and port only: user info and query stay out
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://user:pw@10.0.0.5:9000/p?token=x")
    assert endpoint_label() == "https://10.0.0.5:9000"
