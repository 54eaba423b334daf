"""Using a model: guided sampling from modules in memory, CLIP scores, labelled grids."""
