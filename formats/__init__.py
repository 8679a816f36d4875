"""Weight files: the safetensors and GGUF header checks, the GGUF reader and its dequantization, reading
weight files into tensors, and the layers that keep GGUF-quantized and fp8-scaled weights as stored.
These modules import nothing from ``engine`` or from the pack's ComfyUI face (``tests/test_layout.py``
checks it); ``quant_ops`` builds on ComfyUI's own operations."""
