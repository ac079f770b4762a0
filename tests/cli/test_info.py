"""``fastadapter info`` (fastadapter/info.py): what it says about a backend that cannot run here."""
import subprocess
import sys

_REPORT = """
import sys
sys.modules["triton"] = None  # as if triton were not installed: importing it raises ModuleNotFoundError
import torch
torch.cuda.is_available = lambda: {cuda}
from fastadapter.info import main
main()
"""


def _info_without_triton(cuda: bool) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", _REPORT.format(cuda=cuda)], capture_output=True, text=True,
                          timeout=300, env={"PATH": "", "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split()[0]: line for line in done.stdout.splitlines()[1:]}


def test_without_triton_on_a_cpu_machine_says_why_it_is_not_needed():
    """The bench venv has no triton on purpose: info must not tell a CPU user to install it (issue 24)."""
    triton = _info_without_triton(cuda=False)["triton"]
    assert "not needed on this machine" in triton and "cpu backend" in triton, triton
    assert "CUDA GPU" in triton


def test_without_triton_on_a_cuda_machine_says_to_install_it():
    triton = _info_without_triton(cuda=True)["triton"]
    assert "pip install triton" in triton and "not needed" not in triton, triton
