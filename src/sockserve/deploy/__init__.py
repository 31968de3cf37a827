"""Deployment: the ``serve`` plan and app, the ``--workers`` supervisor and its workers,
systemd socket activation, the TOML config file and the metrics endpoint."""
