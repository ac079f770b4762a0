""".ci/run's stages (.ci/stages.sh): a failed stage does not stop the ones after it, each prints its time, and the
run ends with every stage's time and a non-zero exit when one failed (issue 24: under ``set -e`` one red stage hid
the ISA and oldest-version stages)."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_stages(body: str) -> subprocess.CompletedProcess:
    script = f"set -uo pipefail; . .ci/stages.sh; {body}"
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_failed_stage_runs_the_rest_and_fails_the_run():
    done = _run_stages("stage first bash -c 'echo one; exit 3'; stage second echo two; stages_summary")
    assert done.returncode == 1, done
    out = done.stdout
    assert "one" in out and "two" in out  # the second stage ran after the first failed
    assert re.search(r"^=== stage first: exit 3 after \d+ s$", out, re.M), out
    assert re.search(r"^=== stage second: exit 0 after \d+ s$", out, re.M), out
    assert re.search(r"^first +\d+ s  exit 3$", out, re.M) and re.search(r"^second +\d+ s  exit 0$", out, re.M)
    assert re.search(r"^total +\d+ s$", out, re.M)
    assert "CI failed" in done.stderr


def test_every_stage_green_exits_zero_and_times_each():
    done = _run_stages("stage a true; stage b sleep 1; stages_summary")
    assert done.returncode == 0, done
    times = dict(re.findall(r"^(a|b) +(\d+) s  exit 0$", done.stdout, re.M))
    assert set(times) == {"a", "b"}, done.stdout


def test_ci_runs_every_stage_through_the_stage_function():
    """No bare command in .ci/run can stop it (no ``set -e``); its stages all go through ``stage``."""
    script = (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"^set -[a-z]*e", script, re.M)
    assert re.search(r"^stages_summary$", script, re.M)
    for name in ("readme-test-command", "slow-tests", "isa-generic", "oldest-versions"):
        assert f"stage {name} " in script
