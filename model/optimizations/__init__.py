"""Making a loaded engine fast: torch.compile with CUDA graphs (torch_compile.py) and DeepSpeed's
inference kernels (deepspeed_kernels.py). Both are chosen by EngineOptions at load time."""
