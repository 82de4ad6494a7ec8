"""`cscope export`: offline HTML report, class × concept tables, SAE weights (SAELens + cscope).

The entry point is `conceptscope_cli.export.stage.export`; the `[export]` section is
`conceptscope_cli.config.sections.ExportConfig`."""
