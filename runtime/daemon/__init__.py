"""The learner side of the runtime: the daemon's lifecycle, its acting/learning loop,
config and checkpoints. Imports torch and `agent`; run it with `python -m runtime.daemon`.
"""
