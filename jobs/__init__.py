"""Ray jobs and command-line entry points."""
