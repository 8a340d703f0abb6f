"""Agent modules written only against the public livekit-agents API (1.8.9); none imports lkrun.

Test fixtures for "lkrun hosts unmodified livekit-agents apps". voice, listener, gatekeeper
and options also run under the official worker (`python <module>.py start`); raises is a
bare entrypoint.
"""
