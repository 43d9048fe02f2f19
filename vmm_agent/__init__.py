"""The VMM agent: the model of the per-VM monitor, one process per VM."""
