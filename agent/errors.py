"""The learner's one error type, raised by the normalisers, the update rules and the
learner, and caught by whoever drives the learner (the daemon's loop)."""


class NonFiniteError(ArithmeticError):
    """A NaN or Inf reached an update; the learner was left exactly as it was."""
