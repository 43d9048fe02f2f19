"""Pure code shared by the platform daemon and the VMM agent: layouts, wire codec, enums, config.

Nothing in this package opens a socket, starts a task or reads the clock on its own.
"""
