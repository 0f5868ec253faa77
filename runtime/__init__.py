"""The runtime around the learner: sensor streams, the daemon, checkpoints, metrics and the
torch-free inference runtime."""
