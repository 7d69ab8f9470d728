"""The generated stubs of the tiermesh contract, and the one command that regenerates them.

Stubs live at `tiermesh/<tier>/v1/` (mirroring the proto packages, so clients write
`from tiermesh.embedder.v1 import embedder_pb2_grpc`); those folders hold generated files only.
`tiermesh protos generate` rewrites them from `protos/`; `tiermesh protos check` fails when they
are stale.
"""

from __future__ import annotations

import filecmp
import importlib
import shutil
import tempfile
from pathlib import Path

# The `tiermesh` package, which holds the stubs beside the kit and the control plane.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(root: Path) -> dict[str, Path]:
    """Generated stub files under `root/tiermesh`, keyed by path relative to `root`: protoc's
    modules and the empty `__init__.py` of each stub package (`tiermesh/<tier>/`, `.../v1/`),
    which make the stubs regular packages that the layer contracts can see."""
    found = {}
    for path in (root / "tiermesh").glob("*/v*/*"):
        if path.name.endswith(GENERATED_SUFFIXES):
            found[str(path.relative_to(root))] = path
            for init in _package_inits(path):
                if init.is_file():
                    found[str(init.relative_to(root))] = init
    return found


def _package_inits(stub: Path) -> tuple[Path, Path]:
    """The `__init__.py` of a stub's version package and of its tier package."""
    return stub.parent / "__init__.py", stub.parent.parent / "__init__.py"


def load_all() -> None:
    """Import every generated module so reflection can describe the whole contract."""
    for relative in generated_files(REPO_ROOT):
        if relative.endswith("_pb2.py"):
            importlib.import_module(relative.removesuffix(".py").replace("/", "."))


def _protoc(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see the message above)")
    for stub in list(generated_files(out_dir).values()):
        for init in _package_inits(stub):
            init.touch()


def generate() -> list[str]:
    """Regenerate the stubs in place; returns the files written."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        _protoc(out)
        for stale in generated_files(REPO_ROOT).values():
            stale.unlink(missing_ok=True)
        written = []
        for relative, path in generated_files(out).items():
            target = REPO_ROOT / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(relative)
    return sorted(written)


def stale() -> list[str]:
    """Generated files that differ from, are missing from or are extra to a fresh generation."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        _protoc(out)
        fresh, current = generated_files(out), generated_files(REPO_ROOT)
        differing = [
            relative
            for relative in fresh.keys() & current.keys()
            if not filecmp.cmp(fresh[relative], current[relative], shallow=False)
        ]
        return sorted([*differing, *(fresh.keys() ^ current.keys())])
