"""The README's promises: CI runs its test command verbatim, and its example of the op runs."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _code_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README.md has no bash block after {marker}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\((awk .*?) README.md\)", script).group(1)
    extracted = subprocess.run(["bash", "-c", f"{awk} README.md"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    assert extracted == _code_block_after("<!-- test-command -->")
    assert "pytest tests" in extracted


def test_readme_starts_with_the_two_commands():
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert "pip install" in _code_block_after(marker)
    assert "fastadapter bench" in _code_block_after("<!-- main-command -->")


def test_readme_op_example_runs():
    text = (ROOT / "README.md").read_text()
    example = re.search(r"## The op\s*```python\n(.*?)```", text, re.S).group(1)
    example = example.replace("S, Hq, Hkv, D, P = 2, 512,", "S, Hq, Hkv, D, P = 2, 64,")  # keep it quick
    namespace: dict = {}
    exec(compile(example, "README example", "exec"), namespace)
    assert namespace["out"].shape == (2, 64, 32, 128)
    assert namespace["gate"].grad is not None


def test_readme_model_example_runs(shared_data, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    example = re.search(r"## A LLaMA-Adapter model\s*```python\n(.*?)```", text, re.S).group(1)
    example = example.replace("../shared/data", str(shared_data))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README model example", "exec"), namespace)
    assert namespace["logits"].shape[-1] == 512
    assert (tmp_path / "run" / "example" / "adapter.safetensors").is_file()  # in the git-ignored run/
