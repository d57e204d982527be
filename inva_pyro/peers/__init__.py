"""Peer models for the comparison with InVA, behind the same interface (see ``base.py``).

``ridge`` (multi-output ridge), ``tensor`` (low-rank tensor-on-tensor regression), ``bart``
(voxel-wise BART). The VAE peers are structures of the InVA Pyro program itself (presets
``vae-concat`` and ``vae-separate``).
"""
from .base import PeerModel
from .bart import VoxelBART
from .ridge import RidgeRegression
from .tensor import TensorRegression

__all__ = ["PeerModel", "RidgeRegression", "TensorRegression", "VoxelBART"]
