"""Who am I and who are the others: launcher discovery, rendezvous, preflight checks, the watchdog,
and the multi-process test harness."""
