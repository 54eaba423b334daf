"""The toy world: a Stable Diffusion small enough to train on a CPU, its shapes dataset, judge and shipped base."""
