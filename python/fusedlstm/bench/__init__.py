"""`fusedlstm bench`: one LSTM layer side by side with its peers, each in a worker process of its
own. By concern:

    timing.py           calls per sample, interleaved samples, idle waits, the FMA and GEMM peaks
    workers.py          the worker processes and the JSON-lines protocol that drives them
    implementations.py  configs, modes, each implementation's timed closures, the run's plan
    report.py           the report's metadata and ratios, the tables, the JSON (atomic), the plot
    cli.py              the command line (``fusedlstm bench``; ``--worker`` starts a worker)
"""
