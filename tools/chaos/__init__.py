"""A chaos run against a running suite (`make run` in another terminal, then `make chaos`):
members of a fresh group hold Subscribe streams while new users join it and members send to
it, concurrently, through the gateway; halfway, nats-server is SIGKILLed and the suite's
supervisor starts it again. Then it reports acknowledged writes against stored ones, the
plaza's member count against the stored one (and how long it took to agree), and for each
stream what it got: events, missed and doubled seqs, and how it ended.

It finds the suite through the files it writes under its data directory (`.run/`:
tools.run_files) and mints tokens as `make token` does (tools.dev_keys).
"""
