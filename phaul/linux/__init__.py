"""The Linux layer: CRIU, the freezer, network namespaces, /proc, host capabilities, files."""
