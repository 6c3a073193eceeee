"""One migration: both sides' state machines, the journal, recovery, preflight and the report."""
