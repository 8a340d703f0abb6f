"""Breaks the job protocol: exits at the first line on stdin that is not a message."""

from speaker import Speaker, run

run(Speaker(survives_bad_lines=False))
