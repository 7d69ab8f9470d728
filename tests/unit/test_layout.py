"""The house rules that keep the code readable: short functions, a CLI that builds without the model
stack. (The layer contracts themselves are checked by `lint-imports`, which scripts/test.sh runs.)"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.topology import TIERS

PRODUCT = ("tiermesh/kit", "tiermesh/control", "services")
LONGEST = 80  # lines, decorators excluded


def product_modules() -> list[Path]:
    """Hand-written product code: the kit, the control plane and the tiers, without their tests."""
    return [
        path
        for root in PRODUCT
        for path in sorted((REPO_ROOT / root).rglob("*.py"))
        if "tests" not in path.relative_to(REPO_ROOT).parts
    ]


def long_functions(path: Path, limit: int = LONGEST) -> list[tuple[str, int]]:
    """(name, lines) of every function in `path` longer than `limit` lines that its module's
    docstring does not name as an exception."""
    tree = ast.parse(path.read_text())
    excused = ast.get_docstring(tree) or ""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
        and f"`{node.name}`" not in excused
    ]


def test_no_product_function_is_longer_than_80_lines_unless_its_module_says_why():
    found = {
        str(path.relative_to(REPO_ROOT)): long for path in product_modules() if (long := long_functions(path))
    }
    assert found == {}, "split these, or name them (`name`) with the reason in the module docstring"


def test_the_length_check_sees_long_functions_and_their_excuses(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    module = tmp_path / "long.py"
    module.write_text(f'"""A module."""\n\n\ndef sprawling():\n{body}\n')
    assert long_functions(module) == [("sprawling", 91)]
    excuse = '"""A module; `sprawling` is long because a table reads best whole."""'
    module.write_text(f"{excuse}\n\n\ndef sprawling():\n{body}\n")
    assert long_functions(module) == []


def test_building_the_cli_imports_no_third_party_package():
    """`tiermesh --help` and `tiermesh envoy render` must work where only the CLI's needs are
    installed (the Envoy image): every command module keeps heavy imports inside its functions."""
    probe = (
        "import sys\n"
        "from tiermesh.control.cli import build_parser\n"
        "build_parser()\n"
        "ours = ('tiermesh', 'services', '__editable__', '_distutils_hack')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
        " - {'__main__'} - {m for m in sys.modules if m.startswith(ours)}))\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_import_contracts_name_every_tier_and_its_stubs():
    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    by_type = {contract["type"]: contract for contract in contracts}
    assert set(by_type["independence"]["modules"]) == {tier.module for tier in TIERS}
    stubs = {name.strip() for name in by_type["layers"]["layers"][-1].split(":")}
    assert stubs == {"tiermesh.common", *(f"tiermesh.{tier.name}" for tier in TIERS)}
