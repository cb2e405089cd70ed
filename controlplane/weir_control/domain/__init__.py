"""Domain transitions as pure functions: (state, command) -> (new state, events).

No database, no clock, no I/O: the store reads the state, calls a transition, writes the new state
and acts on the events in the same transaction (a ``ServingChanged`` bumps the desired-state
revision, which is how every data plane hears of it). The rules about what a change may do, and
whether data planes must hear of it, live here once.
"""
