"""Live detection of abusive talk on a call, from signals the box already has (no cloud, no models).

``talk``: who talks when, from Asterisk's own talk detection (TALK_DETECT → ChannelTalkingStarted/
Finished): monologues and an agent who cannot get a word in. Detectors are pure logic fed with events and
the clock; the call (kasuhara_ari/call.py) feeds them and acts on what they report.
"""
