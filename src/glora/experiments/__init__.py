"""Experiments: the demonstration, named presets, sweeps, the results store, tables and plots."""
