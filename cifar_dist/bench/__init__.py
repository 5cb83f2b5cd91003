"""The throughput benchmark: images/s per device, MFU, speed-up over a plain PyTorch loop."""
