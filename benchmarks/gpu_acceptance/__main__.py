"""``python -m benchmarks.gpu_acceptance``: the GPU acceptance run (see the package's docstring)."""
import sys

from .run import main

sys.exit(main())
