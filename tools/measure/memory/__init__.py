"""Peak memory of one update on the full-size architectures, traced on fake tensors (``make vram``)."""
