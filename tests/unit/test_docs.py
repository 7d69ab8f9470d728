"""The configuration page is generated from the settings' declarations and kept current."""

import dataclasses

from tiermesh.control.docs import CONFIGURATION_PAGE, ports_file_rows, render_configuration, tier_config
from tiermesh.kit.config import FollowingConfig, ServerConfig
from tiermesh.kit.topology import TIERS, read_settings


def test_the_committed_configuration_page_is_current():
    assert CONFIGURATION_PAGE.read_text() == render_configuration(), "run: tiermesh docs config"


def test_every_tier_setting_and_ports_file_key_is_on_the_page():
    page = render_configuration()
    # settings every tier (or every following tier) shares are listed once, with one tier's prefix
    shared = {field.name for field in dataclasses.fields(FollowingConfig)}
    for tier in TIERS:
        config = tier_config(tier)
        assert issubclass(config, ServerConfig), f"{tier.name}: settings must extend ServerConfig"
        for field in dataclasses.fields(config):
            variable = tier.prefix + field.metadata["env"]
            assert field.name in shared or f"`{variable}`" in page, variable
    keys = [key for key, _, _ in ports_file_rows()]
    assert keys == list(read_settings({})), "the page lists every key of the ports file, in order"
    assert all(f"`{key}`" in page for key in keys)


def test_a_ports_file_comment_describes_the_key_below_it(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# the front door\n# (gRPC)\nENVOY_GRPC_PORT=8080\n\nSTORE_PORT=6380\n")
    assert ports_file_rows(env_file) == [
        ("ENVOY_GRPC_PORT", "8080", "the front door (gRPC)"),
        ("STORE_PORT", "6380", ""),
    ]
