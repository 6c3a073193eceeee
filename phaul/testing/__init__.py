"""Test seams plugged in from outside: the lab and fault injection (production code never imports this)."""
