"""The learning core: networks, the one-step A2C learner, optimisers and normalisers.

Nothing here knows about environments, files or clocks: the learner takes transitions
and returns metric dicts; the runtime owns everything else.
"""
