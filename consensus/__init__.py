"""Pure protocol rules shared by the node, the contracts and the simulator.

Nothing in this package performs I/O or reads a clock: every function takes its
inputs explicitly and returns a decision, so all three worlds can agree on it.
"""
