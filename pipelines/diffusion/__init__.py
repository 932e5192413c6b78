"""One-step diffusion super-resolution: the refiner, TSD-SR/OSEDiff backends, tiling, LoRA merge, single files."""
