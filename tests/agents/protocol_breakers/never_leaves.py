"""Breaks the job protocol: exits without leaving its room."""

from speaker import Speaker, run

run(Speaker(leaves_room=False))
