"""What a sweep runs: presets (``presets/*.toml``, packaged), their expansion into one run
per distinct config (``preset``), time estimates (``estimate``) and the learning rates a
tuning sweep chose (``tuned``)."""
