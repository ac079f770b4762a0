"""benchmarks/cpu_build_ab.py: two builds of the CPU kernels side by side in one process (no timing is asserted)."""
from __future__ import annotations

import pytest

from benchmarks import cpu_build_ab
from benchmarks.cpu_build_ab import Config


def test_configs_parse_and_say_what_was_wrong():
    assert Config.parse("bf16:8:512:fb") == Config("bf16", 8, 512, "fb")
    for text, words in [("bf16:8:512", "dtype:Hkv:S:mode"), ("fp16:8:512:fb", "dtype must be one of"),
                        ("bf16:8:512:bwd", "mode one of"), ("bf16:5:512:fb", "must divide"),
                        ("bf16:8:0:fb", "S must be positive")]:
        with pytest.raises(ValueError, match=words):
            Config.parse(text)


def test_compare_runs_both_builds_in_alternating_rounds(monkeypatch):
    """This build against itself (its own namespace as the base): every round runs both, and the row holds the
    medians and the ratios' range."""
    import fastadapter._C  # noqa: F401
    calls = []
    real = cpu_build_ab.op_call

    def counting(namespace, config, inputs):
        call = real(namespace, config, inputs)

        def counted():
            calls.append(namespace)
            call()
        return counted
    monkeypatch.setattr(cpu_build_ab, "op_call", counting)
    row = cpu_build_ab.compare(Config("fp32", 8, 40, "fb"), "fastadapter_cpu", iters=1, rounds=3)
    assert len(calls) == 2 + 2 * 3  # one warm-up call each, then both builds in every round
    assert row["low"] <= row["ratio"] <= row["high"] and row["base_ms"] > 0 and row["this_ms"] > 0


def test_processes_mode_times_each_build_in_a_fresh_process(tmp_path, monkeypatch):
    """--processes: a child process times this build's ops, and every round starts one process per build, the order
    alternating."""
    assert cpu_build_ab.time_in_fresh_process("this", Config("fp32", 8, 40, "fb"), 1, tmp_path / "unused.so") > 0
    started = []

    def fake(build, config, iters, base_library, before):
        started.append(build)
        return 2.0 if build == "base" else 1.0
    monkeypatch.setattr(cpu_build_ab, "time_in_fresh_process", fake)
    row = cpu_build_ab.compare_processes(Config("fp32", 8, 40, "fb"), 1, 3, tmp_path / "unused.so")
    assert started == ["base", "this", "this", "base", "base", "this"]
    assert row == {"base_ms": 2.0, "this_ms": 1.0, "ratio": 2.0, "low": 2.0, "high": 2.0}


@pytest.mark.parametrize("kind", cpu_build_ab.BEFORE)
def test_the_work_before_every_timed_call_runs_untimed_before_it(kind):
    """--before: each timed call comes right after that work (nothing: back to back); every kind runs on a small
    shape; the cache flush reads and writes a buffer twice the last-level cache."""
    config = Config("bf16", 8, 40, "fb")
    work = cpu_build_ab.work_before(kind, config)
    assert (work is None) == (kind == "nothing")
    order = []

    def before():
        order.append("before")
        if work is not None:
            work()
    assert cpu_build_ab._timed(lambda: order.append("call"), 2, before=before) >= 0
    assert order == ["before", "call"] * 2
    if kind == "cache-flush":
        assert work.buffer.numel() * 4 == 2 * cpu_build_ab.last_level_cache_bytes() > 0
        assert work.buffer[-1].item() == 2.0  # read and written twice, not only filled


def test_main_without_a_base_library_says_how_to_make_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cpu_build_ab.main(["--base-library", str(tmp_path / "missing.so"), "--out", str(tmp_path / "ab.txt")])
    assert "--make-base COMMIT" in capsys.readouterr().err


@pytest.mark.slow
def test_make_base_builds_a_commit_that_loads_beside_this_build(tmp_path, capsys):
    """HEAD built as the base (a git worktree, the namespace renamed), loaded into this process and compared on a
    short forward + backward; the report names the config."""
    base = cpu_build_ab.make_base("HEAD", tmp_path / "base_C.so")
    out = tmp_path / "ab.txt"
    assert cpu_build_ab.main(["--base-library", str(base), "--configs", "bf16:8:48:fb", "fp32:32:33:fwd",
                              "--iters", "1", "--rounds", "2", "--out", str(out)]) == 0
    report = out.read_text()
    head = cpu_build_ab.subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True,
                                       cwd=cpu_build_ab.REPO).stdout.strip()
    assert report.startswith(f"base {head} ")  # the commit the base was built from
    assert "bf16 Hkv= 8 S=   48 fb" in report and "fp32 Hkv=32 S=   33 fwd" in report
    assert out.with_suffix(".json").is_file()
    assert cpu_build_ab.main(["--base-library", str(base), "--configs", "fp32:8:40:fb", "--iters", "1", "--rounds",
                              "2", "--processes", "--before", "linear", "--out", str(out)]) == 0
    report = out.read_text()
    assert "in a fresh process each" in report and "after a 4096 x 4096 linear" in report
    assert "fp32 Hkv= 8 S=   40 fb" in report
