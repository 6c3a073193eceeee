"""Standby copies and failover: the primary refreshes a consistent checkpoint of a
running container on a standby host (schedule, refresh), the standby host keeps the
last complete one (store) and runs it on failover, the primary fenced first."""
