"""Training the classifier users keep (MixFix on the cleaned set, Ray Train DDP).

Not built yet: see the open issue "Ray Train MixFix". The cleaning job's manifest
(one row per sample: key, shard, label, is_clean, suggested_label) is its input.
"""
