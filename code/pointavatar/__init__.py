"""PointAvatar, rebuilt: deformable point-based head avatars on current PyTorch."""

__version__ = "0.1.0"
