"""The platform daemon: the model of the VMkernel, one per host."""
