"""`cscope ablate`: faithfulness curves, class ablation and latent edits with the SAE spliced
into the backbone (METHOD §6-§8). Import from the modules: `faithfulness`, `classes`, `edit`."""
