"""The package's import graph: no cycles, and the layers of DESIGN.md §2.

The graph is read statically (``ast``) from every module of ``fastadapter/`` and ``kernels/`` (installed as
``fastadapter.kernels``), and it counts *every* import statement: those at module level and those deferred into a
function body alike (a deferred import hides a cycle from the interpreter, not from the design). ``from P import
n`` is an edge to the module ``P.n`` when it is one, and otherwise to ``P`` (a name defined in ``P``, e.g. its
``__init__``).

Rules (an edge from a module of the first layer may never reach the second):

* kernels (``fastadapter.kernels``) -> anything else of ``fastadapter``: the kernels sit at the bottom;
* the op layer (the top-level modules ``fastadapter.*`` that are no package, and ``fastadapter.backends``) ->
  ``model``, ``training``, ``vision``, ``integrations``, ``recipes``, ``commands``, ``cli``;
* ``model`` -> ``training``, ``vision``, ``integrations``, ``recipes``, ``commands``, ``cli``;
* ``integrations`` -> ``training``, ``vision``, ``recipes``, ``commands``, ``cli`` (it patches models; it trains
  nothing);
* ``vision`` -> ``training``, ``integrations``, ``recipes``, ``commands``, ``cli``;
* ``training`` -> ``recipes``, ``integrations``, ``commands``, ``cli``;
* ``recipes`` (a whole job from the parts below, taking a settings object) -> ``commands``, ``cli``;
* ``commands`` -> ``cli`` (the CLI's parser sits on top of the commands).

Cycles: none, with no exception. The three that issue 21 found are broken, each at the seam it showed:
``loaders/checkpoints`` <-> the loaders, ``training/data`` <-> ``training/chat``, and ``kernels/configs`` <->
``kernels/aot_compile`` <-> every kernel (the launch plan in ``kernels/autotune.py`` compiles the function its
autotuner decorates, through the compiler-facts reader ``kernels/compiler_facts.py``; the compile matrix
``kernels/aot_compile.py`` sits above the kernels).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: The model layer's four packages, and which of the others each may import: the thin model none of them (an
#: adapter slot is the model's own ``layer_adapter``), adapters and loaders the model, tokenizers only the GGUF
#: reader of the loaders (a GGUF file holds the vocabulary).
MODEL_PACKAGES = {"model": set(), "adapters": {"model"}, "loaders": {"model"}, "tokenizers": {"loaders"}}

#: ``layer -> layers it may never import``
FORBIDDEN = {
    "kernels": {"op", "model", "training", "vision", "integrations", "recipes", "commands", "cli"},
    "op": {"model", "training", "vision", "integrations", "recipes", "commands", "cli"},
    "model": {"training", "vision", "integrations", "recipes", "commands", "cli"},
    "integrations": {"training", "vision", "recipes", "commands", "cli"},
    "vision": {"training", "integrations", "recipes", "commands", "cli"},
    "training": {"integrations", "recipes", "commands", "cli"},
    "recipes": {"commands", "cli"},
    "commands": {"cli"},
    "cli": set(),
}


def _modules(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """``{dotted module name: (file, is a package)}`` of fastadapter/ and kernels/ under ``root``."""
    found = {}
    for top, prefix in (("fastadapter", ()), ("kernels", ("fastadapter", "kernels"))):
        for path in (root / top).rglob("*.py"):
            parts = (prefix or (top,)) + path.relative_to(root / top).with_suffix("").parts
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, deferred imports included."""
    modules = _modules(root)
    graph = {}
    for name, (path, package) in modules.items():
        here = name.split(".") if package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
                targets |= submodules
                if len(submodules) < len(node.names) and base in modules:
                    targets.add(base)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def layer(module: str) -> str:
    """The layer of DESIGN.md §2 that ``module`` belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "op"
    if parts[1] in ("kernels", "training", "vision", "integrations", "recipes", "commands", "cli"):
        return parts[1]
    if parts[1] in MODEL_PACKAGES:
        return "model"
    return "op"  # fastadapter.attention, _inputs, reference, backends.*, info, ...


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} ({layer(source)}) imports {target} ({layer(target)})"
                  for source, targets in graph.items() for target in targets
                  if layer(target) in FORBIDDEN[layer(source)])


def test_the_model_layer_packages_import_only_what_they_build_on():
    """model/ (the thin LLaMA), adapters/, loaders/ and tokenizers/ are four concepts: the model imports none of
    the other three, and each of the others only what :data:`MODEL_PACKAGES` lists."""
    def package(module: str) -> str:
        return module.split(".")[1] if module.count(".") >= 1 else ""
    wrong = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                   if package(source) in MODEL_PACKAGES for target in targets
                   if package(target) in MODEL_PACKAGES and package(target) != package(source)
                   and package(target) not in MODEL_PACKAGES[package(source)])
    assert not wrong, wrong


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert len(graph) > 80
    assert "fastadapter.loaders.weights" in graph["fastadapter.loaders.load_hf"]  # from .weights import ...
    assert "fastadapter._cpu_extension" in graph["fastadapter.backends.cpu"]  # from .. import _cpu_extension
    assert "fastadapter" not in graph["fastadapter.backends.cpu"]
    assert "fastadapter.loaders.load_hf" in graph["fastadapter.loaders.checkpoints"]  # deferred, in load_model
    assert "fastadapter.backends.registry" in graph["fastadapter.backends.sdpa"]  # from .registry import Backend


def test_the_package_has_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles (counting imports inside functions): {found}"


def test_the_cycles_that_were_broken_stay_broken():
    graph = import_graph()
    cyclic = set().union(*cycles(graph))
    for module in ("fastadapter.loaders.checkpoints", "fastadapter.loaders.load_hf", "fastadapter.loaders.load_meta",
                   "fastadapter.loaders.load_llama2c", "fastadapter.training.data", "fastadapter.training.chat",
                   "fastadapter.kernels.configs", "fastadapter.kernels.autotune", "fastadapter.kernels.compiler_facts",
                   "fastadapter.kernels.aot_compile", "fastadapter.kernels.forward", "fastadapter.kernels.backward"):
        assert module in graph and module not in cyclic


def test_every_layer_imports_only_the_layers_below_it():
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layering of DESIGN.md §2:\n  " + "\n  ".join(violations)


@pytest.mark.parametrize("source, target, forbidden", [
    ("fastadapter.model.load_x", "fastadapter.training.fsdp", True),
    ("fastadapter.kernels.forward", "fastadapter._inputs", True),
    ("fastadapter.attention", "fastadapter.model.llama", True),
    ("fastadapter.backends.triton", "fastadapter.kernels.forward", False),
    ("fastadapter.commands.train", "fastadapter.training.trainer", False),
    ("fastadapter.recipes.adapter_finetune", "fastadapter.commands._paths", True),
    ("fastadapter.commands.train", "fastadapter.recipes.adapter_finetune", False),
])
def test_the_rules_catch_a_forbidden_edge(source, target, forbidden):
    assert bool(layer_violations({source: {target}})) == forbidden


def test_a_cycle_through_a_deferred_import_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]



def test_importing_the_package_and_building_a_model_imports_neither_triton_nor_dynamo():
    """``import fastadapter``, the loaders, the trainer and a model built on a CPU without TRITON_INTERPRET: Triton
    and torch._dynamo stay unimported (the triton backend's availability check and SDPA's causal-mask helper
    imported them: 1.2 s of ``import fastadapter``). The first call of a fused op imports torch._dynamo anyway
    (torch.library's custom ops disable dynamo around their kernels)."""
    import os
    import subprocess
    import sys

    code = """
import sys, torch
from fastadapter import AdapterConfig, LlamaConfig, LlamaModel, add_adapter, load_model
from fastadapter.training.trainer import TrainConfig, Trainer
from fastadapter.backends import all_backends
model = LlamaModel(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96))
add_adapter(model, AdapterConfig(prompt_len=2, layers=1))
print([b.unavailable_reason() for b in all_backends()])
print(sorted(m for m in ("triton", "torch._dynamo") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
