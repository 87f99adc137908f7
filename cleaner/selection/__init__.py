"""Clean-sample selection (METHOD.md sections 2-3): the EM engine, the library API, the
linear probe, the in-memory and Ray Data fits of the job, and the manifest."""
