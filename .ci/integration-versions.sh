#!/usr/bin/env bash
# CI: the transformers/PEFT integrations' tests (PEFT's own adaption-prompt tests among them) against the OLDEST transformers and peft they support, in a second
# venv (the `test` extra, used by the main test command, installs the newest). The range comes from
# fastadapter/integrations/_versions.py (SUPPORTED_RANGES), so widening it there widens what is tested here.
#
# The venv gets torch (the same release as the main one), the oldest transformers and peft, and pytest; fastadapter
# is installed editable with FASTADAPTER_SKIP_BUILD=1, so it uses the C++ kernels already built into fastadapter/
# by the main install (same torch, same ABI) instead of compiling them again.
#
#   bash .ci/integration-versions.sh            # venv in ${INTEGRATION_VENV:-.venv-integration-oldest}
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${INTEGRATION_VENV:-.venv-integration-oldest}
python=${PYTHON:-python3}
read -r transformers_min peft_min < <("$python" -c '
import runpy
ranges = runpy.run_path("fastadapter/integrations/_versions.py")["SUPPORTED_RANGES"]
print(ranges["transformers"][0], ranges["peft"][0])')
torch_version=$("$python" -c 'import re; print(re.search(r"torch==([0-9.]+)", open("README.md").read()).group(1))')
echo "+ integrations with the oldest supported versions: transformers ${transformers_min}.*, peft ${peft_min}.*" \
     "(torch ${torch_version}) in ${venv}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==${torch_version}"
# datasets: PEFT's tests/testing_utils.py imports it (tests/integrations/test_integrations_peft_suite.py runs PEFT's own tests).
"$venv/bin/python" -m pip install -q "transformers==${transformers_min}.*" "peft==${peft_min}.*" pytest datasets
FASTADAPTER_SKIP_BUILD=1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c 'import transformers, peft; print("+ transformers", transformers.__version__, "peft", peft.__version__)'
status=0
"$venv/bin/python" -m pytest tests/integrations/test_integrations_transformers.py tests/integrations/test_integrations_peft.py \
    tests/integrations/test_integrations_models.py -q -p no:cacheprovider || status=1
# PEFT's own tests/test_adaption_prompt.py of this (oldest) peft, from its sdist, accelerated (slow-marked).
"$venv/bin/python" -m pytest tests/integrations/test_integrations_peft_suite.py -q -m slow -p no:cacheprovider -rA || status=1
exit $status
