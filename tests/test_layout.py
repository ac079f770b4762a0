"""The layout of the tests (docs/testing.md): each test file lives in the folder of the package area it tests, test
modules share code only through conftest.py fixtures and helper modules (never by importing another test module),
and test file names are unique, as pytest's default import mode needs for folders without ``__init__.py``."""
import ast
import collections
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

#: Test folder -> the parts of the checkout it mirrors.
FOLDERS = {
    "ops": ("fastadapter/attention.py", "fastadapter/module.py", "fastadapter/reference.py", "fastadapter/backends"),
    "kernels": ("kernels", "csrc", "fastadapter/decode_linear.py"),
    "model": ("fastadapter/model", "fastadapter/adapters", "fastadapter/loaders", "fastadapter/tokenizers"),
    "vision": ("fastadapter/vision",),
    "training": ("fastadapter/training",),
    "recipes": ("fastadapter/recipes",),
    "integrations": ("fastadapter/integrations",),
    "cli": ("fastadapter/cli.py", "fastadapter/commands", "fastadapter/setting_error.py"),
    "bench": ("benchmarks",),
    "examples": ("examples",),
}
#: Tests of the checkout as a whole (its install routes, its README, its CI script, its import graph, this layout)
#: stay at the top.
TOP_LEVEL = {"test_install.py", "test_readme.py", "test_ci_stages.py", "test_import_graph.py", "test_layout.py"}


def _test_files() -> list[pathlib.Path]:
    return sorted(TESTS.rglob("test_*.py"))


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The top-level names of every module ``path`` imports (absolute imports, at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_folder_mirrors_a_part_of_the_checkout_that_exists():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders == set(FOLDERS), "a test folder that mirrors nothing, or a mirrored area without its folder"
    missing = [f"{folder}: {part}" for folder, parts in FOLDERS.items() for part in parts if not (ROOT / part).exists()]
    assert not missing, f"test folders mirror parts of the checkout that are gone: {missing}"


def test_every_test_file_lives_in_the_folder_of_its_area():
    misplaced = [str(p.relative_to(TESTS)) for p in _test_files()
                 if not (p.parent == TESTS and p.name in TOP_LEVEL)
                 and not (p.parent.parent == TESTS and p.parent.name in FOLDERS)]
    assert not misplaced, (f"test files outside the folders {sorted(FOLDERS)} (or deeper than one folder): "
                           f"{misplaced}; move each into the folder of the package area it tests")


def test_no_test_module_imports_another_test_module_or_conftest():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        bad = sorted(name for name in _imported_modules(path) if name.startswith("test_") or name == "conftest")
        if bad:
            offenders.append(f"{path.relative_to(TESTS)} imports {', '.join(bad)}")
    assert not offenders, ("share code through a fixture in a conftest.py or a helper module (a file of tests/ "
                           f"not named test_*.py), not by importing a test module: {offenders}")


def test_test_file_names_are_unique_and_folders_are_not_packages():
    names = collections.Counter(p.name for p in _test_files())
    assert [name for name, count in names.items() if count > 1] == []
    assert sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("__init__.py")) == []
