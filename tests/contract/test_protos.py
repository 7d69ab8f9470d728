"""The proto contract: lint-clean, versioned packages, and generated stubs that match it."""

import shutil
import subprocess
import sys
from pathlib import Path

from tiermesh.kit import contract, topology

# Every tier of the topology has a package of its own; `common` holds what they share.
SERVICES = {tier.name: tier.service.rsplit(".", 1)[1] for tier in topology.TIERS}
TIERS = ("common", *SERVICES)


def _buf() -> str:
    beside_python = Path(sys.executable).parent / "buf"  # the buf-bin wheel in the virtualenv
    found = str(beside_python) if beside_python.exists() else shutil.which("buf")
    assert found, "buf is not installed: run the README's test command (scripts/test.sh), which installs it"
    return found


def test_generated_stubs_are_up_to_date():
    assert contract.stale() == [], "run: tiermesh protos generate"


def test_buf_lint_passes():
    result = subprocess.run(
        [_buf(), "lint"], cwd=contract.REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_tier_has_a_versioned_package_and_its_service():
    import importlib

    for tier in TIERS:
        proto = contract.PROTO_ROOT / "tiermesh" / tier / "v1" / f"{tier}.proto"
        assert f"package tiermesh.{tier}.v1;" in proto.read_text()
    for tier, service in SERVICES.items():
        module = importlib.import_module(f"tiermesh.{tier}.v1.{tier}_pb2")
        assert module.DESCRIPTOR.services_by_name[service].full_name == f"tiermesh.{tier}.v1.{service}"


def _contains(message, full_name: str, seen: frozenset = frozenset()) -> bool:
    if message.full_name == full_name:
        return True
    return any(
        _contains(f.message_type, full_name, seen | {message.full_name})
        for f in message.fields
        if f.message_type and f.message_type.full_name not in seen
    )


def test_every_response_carries_model_info():
    import importlib

    for tier in SERVICES:
        module = importlib.import_module(f"tiermesh.{tier}.v1.{tier}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                direct = {f.message_type.full_name for f in method.output_type.fields if f.message_type}
                if tier == "gateway":  # the advice lists the versions of every contributing tier
                    assert _contains(method.output_type, "tiermesh.common.v1.ModelInfo"), method.full_name
                else:
                    assert "tiermesh.common.v1.ModelInfo" in direct, f"{method.full_name} lacks ModelInfo"


def test_stub_generation_is_reproducible(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        out.mkdir()
        contract._protoc(out)
    files = contract.generated_files(first)
    assert files and set(files) == set(contract.generated_files(second))
    for relative, path in files.items():
        assert path.read_bytes() == (second / relative).read_bytes()


def test_generated_folders_hold_nothing_hand_written():
    generated = set(contract.generated_files(contract.REPO_ROOT).values())
    for tier in TIERS:
        for folder in (contract.PACKAGE_DIR / tier, contract.PACKAGE_DIR / tier / "v1"):
            extra = [p.name for p in folder.iterdir() if p.is_file() and p not in generated]
            assert extra == [], f"hand-written files in generated folder {folder}: {extra}"
            # the package markers are generated empty: nothing to hand-edit there either
            assert (folder / "__init__.py").read_bytes() == b""


def test_rendered_envoy_config_is_accepted_by_envoy(tmp_path):
    from tiermesh.control.envoy_config import render_envoy, write_checked
    from tiermesh.kit.topology import read_settings

    write_checked(render_envoy(read_settings()), tmp_path / "envoy.yaml")


def _main_ref() -> str:
    """The main branch (a clone's own, else its remote's); a checkout of main without either
    compares with its HEAD, which is main."""
    for ref in ("refs/heads/main", "refs/remotes/origin/main", "HEAD"):
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", ref],
            cwd=contract.REPO_ROOT,
            capture_output=True,
            check=False,
        )
        if found.returncode == 0:
            return ref
    raise AssertionError("buf breaking compares against the main branch: run from a git clone")


def test_buf_breaking_passes_against_the_main_branch():
    """No change to the protos breaks a client of main's (buf's FILE rules)."""
    result = subprocess.run(
        [_buf(), "breaking", "--against", f".git#ref={_main_ref()}"],
        cwd=contract.REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_deleted_field(tmp_path):
    """The check above can fail: deleting a field of main's protos is reported."""
    shutil.copytree(contract.PROTO_ROOT, tmp_path / "protos")
    shutil.copy(contract.REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "tiermesh" / "embedder" / "v1" / "embedder.proto"
    proto.write_text(proto.read_text().replace("  string text = 1;", "  reserved 1;", 1))
    result = subprocess.run(
        [_buf(), "breaking", "--against", str(contract.REPO_ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and 'field "1" with name "text"' in result.stdout, result.stdout
