"""The control plane's command modules; each registers its commands with `add_commands(sub)`."""
