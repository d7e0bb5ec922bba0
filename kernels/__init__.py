"""TVM kernels and schedules (block-sparse, int8, bit-serial), installed as ``graphslim.kernels``.

Empty until the TVM backend lands (issues 6 and 7): no kernel is registered here yet, and nothing
in graphslim imports this package.
"""
