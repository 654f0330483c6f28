"""PyTorch + DeepSpeed reference of the same model and training setup as ``jax_impl``.

model       plain nn.Module Llama, the JAX math (RMSNorm/rotary in fp32, GQA, SwiGLU, fp32 logits)
convert     JAX params <-> torch tensors (names: weightmap.jaxtorch); .pt <-> .npz for jax_impl.checkpoint
ds_config   the DeepSpeed config, a pure function of our Config (the ALCF launcher's settings)
layouts     which engine runs a layout; bad layouts refused before any worker starts
engines     one training step per layout (ZeRO-0..3, hpZ, pipeline, AutoTP, MiCS via FSDP2)
train       ``python -m torch_ref.train``: the launcher and the worker
"""
