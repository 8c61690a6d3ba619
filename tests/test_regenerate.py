"""benchmarks/regenerate.py, the one command behind every committed report: it covers every
report and every bench, passes each bench only options it has, and runs each with the options
its committed report says produced it (so a report regenerated otherwise, or a new bench, shows
up here until regenerate.py's BENCHES says so too)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core_independent

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
# options that say where a run writes or what it notes, not what it measures
WHERE = {"--out", "--note", "--workdir", "--dir"}


def _regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", BENCH_DIR / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["regenerate"] = module
    spec.loader.exec_module(module)
    return module


REGEN = _regenerate()


def _options(words: list[str]) -> list[str]:
    """``words`` without the options in WHERE and their values."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in WHERE:
            skip = True
        elif word.split("=", 1)[0] not in WHERE:
            kept.append(word)
    return kept


def _report_command(report: Path) -> list[str]:
    """The options of the command a report says produced it (its header's longest mention
    of its bench script)."""
    head = "\n".join(report.read_text().splitlines()[:15])
    found = re.findall(r"`(?:python )?(benchmarks/bench_\w+\.py[^`]*)`", head)
    assert found, f"{report.name} names no bench command in its header"
    words = shlex.split(max(found, key=len))
    return words


def test_every_report_and_every_bench_has_one_entry():
    by_report = [b.results for b in REGEN.BENCHES if b.results]
    assert len(by_report) == len(set(by_report))
    reports = {p.name for p in BENCH_DIR.glob("RESULTS*.md")}
    assert reports <= set(by_report), f"reports with no BENCHES entry: {reports - set(by_report)}"
    scripts = {p.name for p in BENCH_DIR.glob("bench_*.py")}
    assert scripts == {b.script for b in REGEN.BENCHES}
    assert len({b.name for b in REGEN.BENCHES}) == len(REGEN.BENCHES)


@pytest.mark.parametrize("bench", REGEN.BENCHES, ids=lambda b: b.name)
def test_options_are_the_bench_own(bench):
    source = (BENCH_DIR / bench.script).read_text()
    declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    negatable = {
        "--no-" + o[2:] for o in declared if re.search(rf'"{o}",[^)]*BooleanOptionalAction', source)
    }
    for words in (bench.full, bench.quick):
        flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
        assert flags <= declared | negatable, (bench.name, flags - declared - negatable)
    if bench.results is not None:
        assert "--out" in declared


@pytest.mark.parametrize("bench", [b for b in REGEN.BENCHES if b.results], ids=lambda b: b.name)
def test_full_pass_reproduces_the_committed_command(bench):
    report = BENCH_DIR / bench.results
    if not report.exists():
        pytest.skip(f"{bench.results} is not committed yet")
    words = _report_command(report)
    assert words[0] == f"benchmarks/{bench.script}"
    assert _options(words[1:]) == list(bench.full), (
        f"{bench.results} was made by {shlex.join(words)}; regenerate.py's full pass of "
        f"{bench.name!r} is {shlex.join(bench.full)}: update BENCHES"
    )


def test_commands_write_where_they_say(tmp_path):
    for bench in REGEN.BENCHES:
        full = bench.command("python", quick=False)
        quick = bench.command("python", quick=True)
        assert full[1] == quick[1] == f"benchmarks/{bench.script}"
        if bench.results:
            assert full[-2:] == ["--out", f"benchmarks/{bench.results}"]
            assert quick[-2:] == ["--out", f"benchmarks/_work/quick/{bench.results}"]
        else:
            assert "--out" not in full + quick


def test_unknown_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        REGEN.main(["--only", "nosuch", "--dry-run"])
    assert "unknown --only ['nosuch']" in capsys.readouterr().err
    assert REGEN.main(["--only", "async,lazy", "--dry-run", "--quick", "--python", "py"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("py benchmarks/bench_async.py --gb 0.05")
    assert out[1].startswith("py benchmarks/bench_lazy.py --mb 16")
