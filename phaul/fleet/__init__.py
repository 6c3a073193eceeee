"""Operations over several hosts: one migration driven from the CLI, placement, evacuation,
and the inventory seam (hosts and leases) they stand on."""
