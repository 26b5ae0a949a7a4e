"""One module per op: eager reference, torch backend, dispatch to triton (kernels/) and cuda (csrc/),
torch.library registration and the public function."""
