"""`fusedlstm bench`: one LSTM layer side by side with its peers, each in a worker process of
its own (see ``fusedlstm.bench.cli``)."""
