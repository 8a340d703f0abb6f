"""Breaks the job protocol: its ready says version 2."""

from speaker import Speaker, run

run(Speaker(protocol=2))
