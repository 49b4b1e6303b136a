"""The frame flow: ingest (sources -> mailboxes), feeds, the slot machinery (batchers, executor slots,
placement, failover), results, overload handling, device facts and the one thread-to-loop boundary.

Nothing here imports the MQTT, analytics, talk, control-plane or cluster packages: they build on it.
"""
