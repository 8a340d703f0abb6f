"""Breaks the job protocol: never says ready."""

from speaker import Speaker, run

run(Speaker(says_ready=False))
