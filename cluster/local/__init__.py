"""The local autoscaling cluster (fake multi-node provider): localcluster.py."""
