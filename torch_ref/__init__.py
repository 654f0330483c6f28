"""PyTorch + DeepSpeed reference of the same model (see the torch_ref issue)."""
