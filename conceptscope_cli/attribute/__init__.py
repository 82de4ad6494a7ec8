"""`cscope attribute`: gradient × activation attribution of CLIP similarity to SAE latents.

`core` holds the math (`attribute_batch`), `run` the command (`attribute`)."""
