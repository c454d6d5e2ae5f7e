"""The triton code generator: the torch module plus generated Triton kernels for every core call.

``codegen`` lowers the IR for kernels (fusing producers of core operands into the cores), derives
one ``KernelSpec`` per core call site and renders ``templates/`` into ``kernels.py``; ``support``
is what the generated code imports at run time; ``aot`` builds the registered kernels for a GPU
target without a GPU (``seqdsl kernels``).
"""
