"""What runs beside a remote kernel (installed as ``egd.launchers``).

Launchers must not import egd: they run on hosts where only the kernel's own Python exists. The ``local``
driver needs none; remote drivers (ssh, yarn) bring theirs.
"""
