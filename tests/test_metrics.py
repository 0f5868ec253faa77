"""metrics.jsonl stays valid JSON lines whatever a kill leaves behind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from runtime.metrics import (
    MetricsLog,
    last_returns,
    metrics_path,
    read_jsonl,
    repair_jsonl,
    set_aside_records_after,
)


def test_torn_last_line_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "ret')
    log = MetricsLog(path)
    log.write({"step": 4})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 4]


def test_unparsable_complete_last_line_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n')
    assert repair_jsonl(path) > 0
    assert read_jsonl(path) == [{"step": 1}]


def test_valid_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert repair_jsonl(path) == 0
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_compressed_run_logs_read_like_plain_ones(tmp_path: Path) -> None:
    lines = [json.dumps({"step": i, "return": float(i)}) for i in range(3)]
    (tmp_path / "metrics.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    assert metrics_path(tmp_path) == tmp_path / "metrics.jsonl.gz"
    assert [r["step"] for r in read_jsonl(metrics_path(tmp_path))] == [0, 1, 2]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")
    assert metrics_path(tmp_path) == tmp_path / "metrics.jsonl"  # a live run wins


def test_records_after_the_resumed_checkpoint_are_moved_aside_not_deleted(
        tmp_path: Path) -> None:
    path, aside = tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.orphaned-x"
    path.write_text('{"step": 90}\n{"step": 100}\n{"step": 130}\n{"step": 170}\n{"step": 1')
    assert set_aside_records_after(path, 100, aside) == 3
    assert [r["step"] for r in read_jsonl(path)] == [90, 100]
    assert aside.read_text() == '{"step": 130}\n{"step": 170}\n{"step": 1'  # torn line too
    assert set_aside_records_after(path, 100, tmp_path / "again") == 0
    assert not (tmp_path / "again").exists()


def test_last_returns_reads_the_newest_games_from_a_long_log(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert last_returns(path, 100) == []
    lines = [json.dumps({"step": i, "return": float(i), "pad": "x" * 200}) for i in range(2000)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 2000, "ret')  # a torn tail
    assert last_returns(path, 100) == [float(i) for i in range(1900, 2000)]
    assert last_returns(path, 5000) == [float(i) for i in range(2000)]
