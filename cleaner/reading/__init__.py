"""Reading: URIs (local, file://, s3://), WebDataset shards, and the checks run before compute."""
