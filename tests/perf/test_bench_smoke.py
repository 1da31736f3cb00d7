"""The benchmark harness works end to end (seconds, default suite): the load generator against
a canned server and against a real daemon over the Unix socket and TCP, the in-process limit,
the naive server, and the whole `bench.run` on one model with every server, peer included; the
gRPC row (ModelInfer, raw contents) over the Unix socket with the daemon's defaults (--defaults)
and over TCP with the bearer token.
Numbers are not checked against targets here (a shared CI box is too noisy); the real
benchmark is `pytest -m slow tests/perf` or `lastmile bench`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lastmile.appliance.v2codec import encode_request
from lastmile.appliance.client.loadgen import Target, closed_loop, generator_capacity, http_request, open_loop, read_response
from bench.run import Bench, grpc_generator_capacity, grpc_request, limit_at, median_pass, table
from lastmile.models.demo import example_inputs

ROOT = Path(__file__).resolve().parents[2]


async def test_generator_counts_requests_and_errors_against_a_canned_server():
    req = http_request(Target(unix="/x"), "POST", "/v2/models/m/infer", b"{}")
    result = await generator_capacity(req, b"y" * 100, concurrency=4, duration_s=0.3)
    assert result.requests > 50 and result.errors == 0
    assert result.p50_ms is not None and result.p50_ms <= result.p99_ms <= result.max_ms


async def test_loadgen_against_a_real_daemon_unix_and_open_loop(daemon):
    target = Target(unix=str(daemon.socket))
    reader, writer = await target.connect()
    writer.write(http_request(target, "POST", "/v2/repository/models/demo-mlp/load", b"{}"))
    status, _ = await read_response(reader)
    writer.close()
    assert status == 200
    inputs = example_inputs("mlp", 1)
    body, headers = encode_request(inputs, {"input": "FP32"})
    req = http_request(target, "POST", "/v2/models/demo-mlp/infer", body, headers)
    closed = await closed_loop(target, req, concurrency=4, duration_s=0.5, warmup_s=0.1)
    assert closed.requests > 10 and closed.errors == 0
    opened = await open_loop(target, req, rate=100, duration_s=0.3)
    assert opened.requests == 30 and opened.errors == 0 and opened.lag_p99_ms is not None
    # errors are counted, not hidden: a model that is not loaded answers 404
    bad = http_request(target, "POST", "/v2/models/nope/infer", body, headers)
    failed = await closed_loop(target, bad, concurrency=2, duration_s=0.2, warmup_s=0.0)
    assert failed.errors > 0 and failed.requests == 0 and "HTTP 404" in failed.error_samples[0]


def test_median_pass_keeps_whole_runs_and_every_figure():
    def one(limit: float, rps: float, p50: float) -> dict:
        return {"backend": "onnxruntime", "settings": {}, "limit": {"best_rows_per_s": limit},
                "servers": {"lastmile": {"64": {"throughput_rps": rps, "p50_ms": p50}}}}

    merged = median_pass([one(100, 30, 3.0), one(300, 10, 1.0), one(200, 20, 2.0)])
    assert merged["limit"]["best_rows_per_s"] == 200 and merged["limit"]["repeats"] == [100, 300, 200]
    row = merged["servers"]["lastmile"]["64"]
    assert row["throughput_rps"] == 20 and row["p50_ms"] == 2.0  # the median run, not a mix
    assert row["repeats"] == [30, 10, 20]


@pytest.mark.parametrize("argv, says", [
    (["--repeat", "0"], "--repeat: got 0"),
    (["--servers", "lastmile,bogus"], "--servers: unknown ['bogus']"),
    (["--clients", "1,x"], "--clients: expected comma-separated integers"),
    (["--settings", "[1]"], "--settings must be a JSON object"),
    (["--defaults", "--settings", '{"threads": 1}'], "--defaults loads every model with no settings"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, says):
    out = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


async def test_grpc_generator_counts_requests_against_a_canned_server():
    x = example_inputs("mlp", 1)["input"]
    result = await grpc_generator_capacity(grpc_request({"input": x}, {"input": "FP32"}, "m"), concurrency=2, duration_s=0.3)
    assert result.requests > 10 and result.errors == 0 and result.target.startswith("grpc:unix:")
    assert result.p50_ms is not None and result.p50_ms <= result.p99_ms <= result.max_ms


def test_bench_grpc_row_with_the_daemons_defaults(demo_store: Path):
    """The gRPC row for real on demo-mlp over the Unix socket, next to the binary HTTP row, the
    model loaded with no settings (--defaults): rows measured, no errors, its answer equal to
    HTTP's, the daemon's batching figures and CPU per request, and the defaults the daemon
    reports are the ones the limit ran with."""
    bench = Bench(models=["demo-mlp"], clients=[1, 4], duration_s=0.4, warmup_s=0.1, servers=["lastmile", "lastmile-grpc"],
                  transport="unix", settings={}, store=demo_store, open_rate=50, progress=lambda _: None, defaults=True)
    try:
        result = bench.run()
    finally:
        bench.close()
    entry = result["models"]["demo-mlp"]
    assert entry["load_parameters"] == {} and result["meta"]["defaults"] is True
    # the vocabulary's max_delay_ms and threads, the manifest's max_batch_size (demo-mlp's says 32)
    assert entry["settings"] == entry["daemon_settings"] == {"max_batch_size": 32, "max_delay_ms": 2.0, "threads": 0}
    assert set(entry["limit"]["by_batch"]) == {"1", "2", "4", "8", "16", "32"}
    assert entry["grpc_answers_match_http"] is True
    assert result["generator_grpc"]["requests"] > 0
    rows = entry["servers"]["lastmile-grpc"]
    for clients in ("1", "4"):
        row = rows[clients]
        assert row["requests"] > 0 and row["rows_per_s"] > 0 and row["errors"] == 0, (clients, row["error_samples"])
        assert row["target"].startswith("grpc:unix:") and row["target"].endswith("lastmile-grpc.sock")
        assert row["p50_ms"] <= row["p99_ms"] and row["vs_limit"] > 0 and row["avg_batch_size"] >= 1
        assert row["server_cpu_us"] > 0 and row["loadgen_cpu_us"] > 0 and isinstance(row["generator_bound"], bool)
    assert rows["1"]["added_p50_ms"] is not None and rows["4"]["vs_limit_same_batch"] > 0
    assert rows["open@50"]["requests"] == 20 and rows["open@50"]["errors"] == 0
    text = table(result)
    assert "lastmile-grpc @4" in text and "(--defaults)" in text and "gRPC:" in text


def test_limit_interpolates_between_measured_batches():
    limit = {"by_batch": {"1": {"rows_per_s": 100.0}, "4": {"rows_per_s": 300.0}, "16": {"rows_per_s": 500.0}}}
    assert limit_at(limit, 1) == 100.0
    assert limit_at(limit, 2) == pytest.approx(200.0)
    assert limit_at(limit, 8) == pytest.approx(400.0)
    assert limit_at(limit, 64) == 500.0


@pytest.mark.skipif(importlib.util.find_spec("litserve") is None, reason="the peer (litserve, dev extra) is not installed")
def test_bench_run_one_model_every_server_tcp(demo_store: Path):
    """`bench.run` on demo-mlp: limit, Lastmile (binary, JSON and gRPC), naive, LitServe; TCP
    for Lastmile (bearer token, gRPC's too) and the naive server."""
    lines: list[str] = []
    servers = ["lastmile", "lastmile-json", "lastmile-grpc", "naive", "peer"]
    bench = Bench(models=["demo-mlp"], clients=[1, 4], duration_s=0.4, warmup_s=0.1, servers=servers,
                  transport="tcp", settings={"max_batch_size": 8}, store=demo_store, open_rate=None, progress=lines.append)
    try:
        result = bench.run()
    finally:
        bench.close()
    entry = result["models"]["demo-mlp"]
    assert entry["limit"]["best_rows_per_s"] > 0 and set(entry["limit"]["by_batch"]) == {"1", "2", "4", "8"}
    assert entry["limit"]["one_call_paced_p50_ms"] > 0
    for server in servers:
        for clients in ("1", "4"):
            row = entry["servers"][server][clients]
            assert row["requests"] > 0 and row["errors"] == 0, (server, clients, row["error_samples"])
            assert row["vs_limit"] > 0
        assert entry["servers"][server]["1"]["added_p50_ms"] is not None
        assert entry["servers"][server]["1"]["added_p50_paced_ms"] is not None
        assert entry["servers"][server]["4"]["server_cpu_us"] > 0 and entry["servers"][server]["4"]["loadgen_cpu_us"] > 0
    assert entry["servers"]["lastmile"]["4"]["avg_batch_size"] >= 1
    assert entry["servers"]["lastmile"]["4"]["vs_limit_same_batch"] > 0
    assert entry["servers"]["lastmile-grpc"]["4"]["target"].startswith("grpc:127.0.0.1:") and entry["grpc_answers_match_http"] is True
    text = table(result)
    assert "| demo-mlp | onnxruntime |" in text and "peer @4" in text
    json.dumps(result)  # the raw result is JSON as is
