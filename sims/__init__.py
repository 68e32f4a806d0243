"""Simulation harness: the real role code over an in-memory network and a virtual clock."""
