"""Breaks the job protocol: exits without done when its job is shut down."""

from speaker import Speaker, run

run(Speaker(sends_done=False))
