"""How a process learns its rank, chooses its device and reaches the others: cluster
environments, devices and backends, the rendezvous, the process group, rank helpers, heartbeats."""
