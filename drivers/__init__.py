"""egd's built-in drivers (installed as ``egd.drivers``): one module per resource manager."""
