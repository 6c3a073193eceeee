"""The CLI's side of migrations: one migration driven and controlled (Ctrl-C, follow, abort),
placement, evacuation, and the inventory seam (hosts and leases) they stand on."""
