"""Benchmarks: what the software costs (speed, memory, operations) and how it holds up
(kills, regressions). Scripts that print figures, usually one JSON object; the figures and
their commands are in docs/performance.md and docs/results.md.

    throughput    steps/s of the daemon's loop beside faithful baselines
    latency       decision latency and CPU time per step, under learning
    versions      steps/s of the loop at two commits, side by side
    ops           torch operations dispatched per learner step
    publish       what publishing policies costs the learning loop
    infer         action latency and peak memory, ONNX runtime vs torch actor
    memory        the daemon's RSS over a long run (a leak test)
    stream        a sensor stream alone, with random actions
    same_numbers  whether the learner computes what it did at another commit
    same_run      whether whole daemon runs give what they gave at another commit
    soak_kill     SIGKILL the daemon at random moments and check nothing was lost
"""
