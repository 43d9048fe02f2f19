"""``vmmem-load``: drives workload phases on running agents and verifies every page."""
