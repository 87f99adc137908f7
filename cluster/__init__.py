"""Cluster configs; cluster.local holds the local autoscaling cluster tool."""
