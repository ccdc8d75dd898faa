"""Evidence: what may be done to a recording, by whom, and on the record.

:mod:`.desk` is the one service layer the faces call (``kasuhara recordings`` now, the web console
later), so that role checks, audit records and outcomes are the same whichever face is used. Imports
flow one way: ``cli`` → ``evidence`` → (storage, audit, export, search, signing, config); nothing here
imports click or the CLI (tests/test_evidence_desk.py checks it).
"""
