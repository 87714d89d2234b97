import gc

from pipeline.cli import main

code = main()
gc.freeze()  # what is left is freed with the process: skip the collections of exit (seconds with TensorFlow)
raise SystemExit(code)
