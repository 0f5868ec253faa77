"""tools/research/compare_runs.py: paired per-seed figures of two run groups, read from their
logs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tools.research import compare_runs


def write_run(run_dir: Path, returns: list[float], every: int, reached: int,
              packed: bool = False) -> None:
    """A run dir as the daemon (or archive_run, packed) leaves it: one game per `every`
    steps, each with its return and an entropy of return / 100."""
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps({"step": every * (i + 1), "return": r, "entropy": r / 100})
                    + "\n" for i, r in enumerate(returns))
    if packed:
        (run_dir / "metrics.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    else:
        (run_dir / "metrics.jsonl").write_text(lines)
    (run_dir / "status.json").write_text(json.dumps({"step": reached}))


@pytest.fixture
def groups(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a", tmp_path / "b"
    write_run(first / "seed-0", [1, 2, 3, 4, 5, 6], every=10, reached=60)
    write_run(first / "seed-1", [10, 10, 10, 10], every=10, reached=40)
    write_run(first / "seed-7", [1], every=10, reached=10)            # unpaired: left out
    write_run(second / "seed-0", [1, 2, 5, 6, 7, 8], every=10, reached=60, packed=True)
    write_run(second / "seed-1", [10, 10, 12, 12, 14, 14], every=10, reached=60)
    return first, second


def test_cells_pair_the_same_seed_and_the_mean_counts_only_seeds_both_reached(
        groups: tuple[Path, Path]) -> None:
    seeds, table = compare_runs.compare(*groups, steps=[20, 40, 60], field="return", window=2)
    assert seeds == [0, 1]
    assert table[0] == [(1.5, 1.5), (10.0, 10.0)]
    assert table[1] == [(3.5, 5.5), (10.0, 12.0)]
    seed_0, seed_1 = table[2]
    assert seed_0 == (5.5, 7.5)
    assert seed_1[1] == 14.0 and seed_1[0] != seed_1[0]  # A stopped at 40: NaN, not its 40 figure
    text = compare_runs.format_table(seeds, [20, 40, 60], table).splitlines()
    assert text[2].split() == ["40", "3.50", "5.50", "+2.00", "10.00", "12.00", "+2.00",
                               "6.75", "8.75", "+2.00", "2"]
    assert text[3].split() == ["60", "5.50", "7.50", "+2.00", "-", "5.50", "7.50", "+2.00",
                               "1"]


def test_another_field_is_averaged_over_the_same_games(groups: tuple[Path, Path]) -> None:
    _, table = compare_runs.compare(*groups, steps=[40], field="entropy", window=2)
    assert table[0][0] == pytest.approx((0.035, 0.055))


@pytest.mark.parametrize("argv, expected", [
    (["missing", "{b}"], "missing: no run dirs"),
    (["{a}", "{b}", "--field", "loss"], "no field 'loss'"),
    (["{a}", "{b}", "--from", "50", "--to", "10"], "--from 50 is past --to 10"),
    (["{a}", "{b}", "--every", "0"], "--every"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], expected: str,
                                         groups: tuple[Path, Path], capsys) -> None:
    first, second = groups
    argv = [arg.format(a=first, b=second) for arg in argv]
    assert compare_runs.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compare_runs: error:") and expected in err
