"""phaul: live migration of Linux containers between hosts with CRIU."""

__version__ = "0.1.0"
