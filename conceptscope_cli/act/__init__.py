"""From finding to action: bias groups per image (`cscope groups`), a check of a classifier
against them (`cscope check-model`) and a bias diff between two categorizations (`cscope diff`).

`claims` reads bias claims from a categorization; `stats` holds the math (plain functions over
arrays); `groups`, `check` and `diff` are the stages that read and write files. The method
is described in docs/METHOD.md, "From finding to action".
"""
