"""Sparse autoencoders: model, losses, data streaming, checkpoints and the training loop.

Import from the modules (`model`, `trainer`, `checkpoint`, ...); the `[sae]` section is
`conceptscope_cli.config.sections.SAEConfig`."""
