"""One migration, on both hosts.

- `source`: the source's state machine (preflight, pre-copy, freeze and final
  dump, transfer, restore, commit, resume, clean-up) and what it holds (`Held`).
- `failure`: what the source does when a step fails: the invariant's rules.
- `dest`: the destination's side of the same protocol.
- `steps`: the step boundaries and the step hook called at each (a no-op in production).
- `journal`: each side's durable record of the steps it reached.
- `recovery`: settling what failures and restarts left unfinished.
- `copies`: what a host holds of a container, read from the system itself.
- `preflight`: the checks `phaul check` and `migrate` run first.
- `report`: the migration report, and its assembly while the migration runs.
- `logs`: a logger adapter that names the migration.
"""
