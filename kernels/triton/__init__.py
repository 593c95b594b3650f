"""Triton implementations of the kernels in `kernels/`, one module per op.

Each `<name>_triton` function has the signature and the semantics of the PyTorch reference
`<name>_ref` beside the public function; `kernels.dispatch` routes CUDA tensors here. Importing
this package needs `triton`; nothing here is imported on a machine without it. Under
`TRITON_INTERPRET=1` the same kernels run on CPU tensors, which is how CI tests them.
"""
