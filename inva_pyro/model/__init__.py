"""Stage 2, the model: the InVA Pyro program (generative model and guide), its networks, convolutional
blocks and the extra objective terms of the VAE tutorial. No training loop and no file I/O here.
"""
