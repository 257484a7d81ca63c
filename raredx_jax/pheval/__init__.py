"""PhEval runner plugin for raredx-jax (`pip install -e ".[pheval]"`; `pheval run -r raredxphevalrunner ...`).

`steps` holds the prepare / run / post-process work and needs no PhEval; `runner` is the `PhEvalRunner` subclass
PhEval loads through its ``pheval.plugins`` entry point (it imports PhEval).
"""
