"""egd: a Twisted kernel gateway that runs Jupyter kernels on a cluster for unchanged Jupyter clients."""

__version__ = "0.1.0"

#: The Jupyter Server REST API version egd speaks (what ``GET /api`` reports as ``version``).
API_VERSION = "2.21.1"
