"""Scoring: CLIP model loading, prompt ensembles, the scorer stage and the streaming pipeline."""
