"""Offline moves and cold copies (the `offline` memory method): what they are, and
a copy's configuration.

Nothing of the container's memory travels. A move (`phaul migrate --offline`, and
any `phaul migrate` of a container that is created or stopped) runs, through the source's
state machine (phaul.migration.source) and its journal:

    preflight -> fs-presync (rsync while it runs) -> dump (stop: SIGTERM, SIGKILL
    after a timeout, as `phaul ct stop`) -> transfer (the final rsync) -> restore
    (the destination creates the container from the Prepare configuration, never
    from received files) -> resume (the destination starts its command, if it ran
    here: the commit) -> the stopped source copy is destroyed -> cleanup.

The invariant holds by the order: the source copy is stopped before the
destination's starts, and destroyed only after the destination's runs. A failure
before the destination's start aborts the destination and starts the source copy
again if it ran (`settle_offline`); a start whose outcome is unknown is `in_doubt` (never
restart a copy that may run elsewhere).

The steps are `SourceMigration._offline_phase` (phaul.migration.source), the
failure rules `phaul.migration.failure.settle_offline`, the destination's side
`Destination.restore`/`resume` with `Incoming.offline` (phaul.migration.dest),
an agent restart's `Recovery` (phaul.migration.recovery), all reading the journal
marks below.

A copy (`phaul copy`) is a cold copy: the file system is synced while the source
runs on, untouched, and the destination starts the copy's command afresh under its
own ID and address (`copy_config`). The copy starts from the file system, not from
the memory: a live copy would restore the source's TCP connections and address
from CRIU's images, which a second running copy must not have.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from phaul.containers import ContainerConfig
from phaul.errors import InvalidInput
from phaul.validate import check_id

STOP_TIMEOUT = 10.0  # s: the container's init gets SIGTERM, then SIGKILL after this (`phaul ct stop`'s default)
OFFLINE_MARK = "offline"  # journal step: an offline move (source); its command not run (destination)
OFFLINE_START = "offline-start"  # journal step (destination): an offline migration whose Resume runs the command
COPY_MARK = "copy"  # journal step (source): a copy; the source copy is never touched


def copy_config(config: ContainerConfig, copy_as: str, copy_ip: str) -> tuple[ContainerConfig, str]:
    """The configuration of a copy of `config` under ID `copy_as` with address `copy_ip`
    ("": none), and a note for the report. Raises InvalidInput for an ID or address the
    copy cannot have (the source's own)."""
    check_id(copy_as, "copy ID (--as)")
    if copy_as == config.id:
        raise InvalidInput(f"the copy must have an ID of its own, not {config.id}'s", "give another one with --as NEWID")
    note = f"cold copy of {config.id} as {copy_as}: its file system, its command started afresh"
    if copy_ip:
        try:
            iface = ipaddress.ip_interface(copy_ip)
        except ValueError:
            raise InvalidInput(f"invalid --ip {copy_ip[:60]!r}", "give ADDR/PREFIX, e.g. 10.77.0.21/24") from None
        if "/" not in copy_ip:
            raise InvalidInput(f"--ip {copy_ip} has no prefix length", "give ADDR/PREFIX, e.g. 10.77.0.21/24")
        if config.ip and ipaddress.ip_interface(config.ip).ip == iface.ip:
            raise InvalidInput(
                f"--ip {copy_ip} is {config.id}'s own address; two running copies never share one",
                "give the copy an address of its own",
            )
        note += f", address {copy_ip}"
    elif config.ip:
        note += f"; {config.id} has {config.ip}: the copy has no address (give it one with --ip)"
    # The MAC is derived from the ID when it is not set: the copy gets its own.
    copy = dataclasses.replace(
        config, id=copy_as, ip=copy_ip or None, mac=None, gateway=config.gateway if copy_ip else None, args=list(config.args),
    )
    return copy, note
