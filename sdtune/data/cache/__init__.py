"""Content-keyed VAE latents and text-encoder outputs: what `sdtune prep cache` writes and `fit --data.cache` reads.

`keys` names entries, `index` reads and writes a built cache, `encode` computes entries, `training` gives a training
run the entries of its samples (computing what is missing).
"""
