"""Kernels: specs, environments, the ZeroMQ channels, one kernel's life, and the manager of them all."""
