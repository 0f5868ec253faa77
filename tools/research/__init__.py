"""Learning experiments: run configs over seeds, compare and plot the runs, and the yardstick
they are measured against. The results and their commands are in docs/results.md and
docs/experiments.md.

    sweep                a grid of configs x overrides x seeds, each run a daemon, one table
    daemon_pool          runs those daemons: local processes or one Ray task each
    learning             one preset through the daemon for a budget of agent steps
    cartpole             how reliably the defaults learn CartPole-v1 over seeds
    control              the defaults against the reference on small control tasks
    reference_stream_ac  the public stream AC(lambda) learner, re-implemented
    compare_runs         two run groups side by side, seed by seed, every K steps
    plot_metrics         learning curves of runs or of configs over seeds
    seed_stats           statistics over seeds: last-games mean, IQM, bootstrap intervals
"""
