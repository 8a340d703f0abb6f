"""Breaks the job protocol: goes on after a shutdown (it still ends on stdin EOF)."""

from speaker import Speaker, run

run(Speaker(obeys_shutdown=False))
