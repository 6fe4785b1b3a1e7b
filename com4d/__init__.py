"""COM4D: compositional 4D scene reconstruction (CVPR 2026), clean PyTorch implementation."""
__version__ = "0.1.0"
