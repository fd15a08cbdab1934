"""`digits bench http` runs on a tiny configuration and writes valid reports; the load generators count right."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from digits.bench import BenchError
from digits.bench.http import STAGES
from digits.bench.load import Target, find_ab, parse_ab, pooled, run_load

from digits.cli import main


def test_http_bench_writes_json_markdown_and_plot(int8_artifacts, tmp_path, capsys):
    # the int8 file, served: it archives and serves like the fp32 one; python load generator: no ab needed
    out = tmp_path / "http"
    args = ["bench", "http", "--model", "mlp", "--format", "onnx-int8", "--artifacts", str(int8_artifacts)]
    load = ["--concurrency", "1,2", "--requests", "16", "--rounds", "2", "--warmup", "4", "--load-generator", "python"]
    assert main([*args, *load, "--out", str(out)]) == 0
    report = json.loads((out / "bench-http.json").read_text())
    assert report["body"]["width"] == 28 and report["body"]["content_type"] == "image/png"
    assert [row["concurrency"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        for target in ("model", "noop"):
            assert row[target]["requests"] == 16 and row[target]["errors"] == 0
            assert row[target]["requests_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["model"]["requests_per_s"] / row["noop"]["requests_per_s"], abs=1e-3)
        # equal requests a round: the pooled ratio is a time-weighted mean of the rounds' ratios
        assert len(row["round_ratios"]) == 2 and min(row["round_ratios"]) - 1e-3 <= row["ratio"]
        assert row["ratio"] <= max(row["round_ratios"]) + 1e-3
        split = row["handler"]
        assert split["batches"] >= 8 and split["mean_batch_size"] >= 1  # 16 requests, batches of at most 2
        assert all(split[stage]["mean_ms"] >= 0 for stage in STAGES)
    markdown = (out / "bench-http.md").read_text()
    assert "| concurrency | model req/s | no-op req/s | model / no-op |" in markdown and "decode" in markdown
    assert (out / "bench-http.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "torchserve" / "logs" / "ts_log.log").is_file()  # kept, to look into
    assert markdown in capsys.readouterr().out


AB_SUMMARY = """
Time taken for tests:   0.500 seconds
Complete requests:      100
Failed requests:        60
   (Connect: 1, Receive: 2, Length: 50, Exceptions: 3)
Non-2xx responses:      4
"""
AB_CSV = "Percentage served,Time in ms\n" + "".join(f"{p},{p / 10:.3f}\n" for p in range(101))


def test_ab_length_failures_are_not_errors():
    # predictions differ in length by nature; ab counts every body unlike the first as a failure
    result = parse_ab(AB_SUMMARY, AB_CSV)
    assert (result.requests, result.errors, result.requests_per_s) == (100, 1 + 2 + 3 + 4, 200)
    assert (result.latency.p50_ms, result.latency.p90_ms, result.latency.p99_ms) == (5.0, 9.0, 9.9)


def test_rounds_pool_into_one_result():
    rounds = [parse_ab(AB_SUMMARY, AB_CSV), parse_ab(AB_SUMMARY.replace("0.500", "1.500"), AB_CSV)]
    result = pooled(rounds)
    assert (result.requests, result.errors, result.seconds) == (200, 20, 2.0)
    assert result.requests_per_s == 100  # total over total, not the mean of the rates
    assert result.latency == rounds[0].latency  # two copies of one distribution are that distribution


def test_a_missing_ab_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(BenchError, match="apt-get install apache2-utils.*--load-generator python"):
        find_ab()


class _Echo(BaseHTTPRequestHandler):
    """Answers every POST 200, except bodies starting with b"bad" (400)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 400 if body.startswith(b"bad") else 200
        self.send_response(status)
        self.send_header("Connection", "keep-alive")  # ab speaks HTTP/1.0: it reuses only a connection said so
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def echo_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/predictions/echo"
    server.shutdown()


GENERATORS = [
    "python",
    pytest.param("ab", marks=pytest.mark.skipif(shutil.which("ab") is None, reason="ab (apache2-utils) not installed")),
]


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("payload, errors", [(b"good", 0), (b"bad", 12)])
def test_load_generators_count_requests_and_errors(generator, payload, errors, echo_url, tmp_path):
    body = tmp_path / "body.bin"
    body.write_bytes(payload)
    result = run_load(generator, Target(echo_url, "token", body, "application/octet-stream"), 3, 12)
    assert (result.requests, result.errors) == (12, errors)
    assert 0 < result.latency.p50_ms <= result.latency.p99_ms


def test_the_log_cursor_reads_what_was_logged_since_its_mark_across_rollovers(tmp_path):
    """ts_log.log rolls over at 10 MB (gzipped as ts_log.N.log.gz, oldest N = 1) several times in one bench run:
    what was written after the mark must be read whole, from the rolled files too, and nothing before it."""
    import gzip
    from datetime import datetime, timedelta

    from digits.bench.http import LOG_TIME_FORMAT, LogCursor

    def line(when: datetime, text: str) -> str:
        return f"{when.strftime(LOG_TIME_FORMAT)[:23]} [INFO ] W-9000-cnn_1.0-stdout MODEL_METRICS - {text}\n"

    now = datetime.now()
    cursor = LogCursor(tmp_path)
    (tmp_path / "ts_log.log").write_text(line(now - timedelta(seconds=5), "before"))
    cursor.mark()
    later = [now + timedelta(seconds=s) for s in (1, 2, 3)]
    # what log4j (DefaultRolloverStrategy, fileIndex "max") leaves after two rollovers: the oldest in .1, the
    # next in .2, the newest in the live file (seen in a bench run's folder: .1 ended where .2 began)
    (tmp_path / "ts_log.1.log.gz").write_bytes(
        gzip.compress((line(now - timedelta(seconds=5), "before") + line(later[0], "first")).encode())
    )
    (tmp_path / "ts_log.2.log.gz").write_bytes(gzip.compress(line(later[1], "second").encode()))
    (tmp_path / "ts_log.log").write_text(line(later[2], "third") + "a continuation line without a time\n")
    read = cursor.read().splitlines()
    assert [row.rsplit(" - ", 1)[1] for row in read] == ["first", "second", "third"]
