"""Talking to other hosts.

- `client`: the gRPC client of an agent, with deadlines and clear errors.
- `messages`: conversions between the protocol's messages and phaul's dataclasses.
- `transport`: per-migration mutual-TLS data channels.
- `fs_sync`: the file-system sync interface (`FsSync`) and its rsync back-end.
- `pki`: the CA and the certificates of hosts and admins.
"""
