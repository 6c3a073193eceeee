"""The Linux layer under the migration.

- `criu`: the commit gate that holds a dumped container, CRIU's statistics and log.
- `freezer`: freezing a container's cgroup before CRIU does.
- `network`: a container's address, veth and bridge port; holding its traffic
  while it moves.
- `procfs`: what /proc says about a process.
- `doctor`: what the host offers (CRIU, soft-dirty, userfaultfd, runc, cgroups),
  detected at run time.
- `run`: the one subprocess runner (argument lists only; a failure says what to do).
- `fsutil`: atomic, durable writes and small file helpers.
"""
