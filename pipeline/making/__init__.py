"""Making an output: list, preprocess, featurize, reduce and write; run and update share job.py."""
