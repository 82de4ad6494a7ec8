"""`cscope train` as a pipeline stage: the SAE library (`conceptscope_cli.sae`) behind a cache entry."""
